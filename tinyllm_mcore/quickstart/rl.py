"""`python -m tinyllm_mcore.quickstart.rl --output-dir D` (or `tinyllm-quickstart-rl`): GRPO shown to learn, in a
few minutes on 2 CPU cores.

    task files -> tokenizer -> SFT (DP2, torchrun) on an unreliable teacher's worked answers -> HF export (hf_sft)
               -> GRPO (DP2) with the exact-match verifier -> HF export (hf_grpo)
               -> held-out accuracy of both exports with transformers' greedy decoding -> D/report.md

The task (rl_task.py): sums of three one-digit numbers, answered in two worked lines and an answer tag that the
teacher often fills with the wrong line. SFT learns the arithmetic and the careless habit; GRPO, rewarded only for a
right final answer, learns to restate the line it computed, and the held-out score (the last integer in the greedy
answer equals the answer, on problems in neither SFT's nor GRPO's data) rises from about a third to nearly all.

Written: D/rl/eval.jsonl (held-out problems), D/rl/hf_sft and D/rl/hf_grpo (HF exports, chat template included),
D/rl/eval.json (both scores and sample answers), D/rl/reward_curve.png, D/report.md; checkpoints, metrics, logs
and TensorBoard events beside them as in the main quickstart (pipeline.py runs each step the same way).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from tinyllm_mcore.quickstart.pipeline import (Run, check_steps_import_this_package, exit_status, prepare_run_dir,
                                               python, run_step, tokenizer_vocab_size, torchrun)
from tinyllm_mcore.runtime.files import atomic_write_text
from tinyllm_mcore.runtime.quiet import add_verbose_flag


@dataclass
class RLSettings:
    """Tuned so that on 2 CPU cores SFT's greedy held-out accuracy is about 30% and GRPO's above 90%, in under 5
    minutes. GRPO's learning rate is low on purpose: Adam's first steps move every weight by about the learning rate
    whatever its gradient, and at SFT's rates that noise swamps the few tokens in which a group's answers differ."""
    model_size: str = "16m"
    data_parallel: int = 2
    seq_length: int = 64
    teacher_samples: int = 4  # teacher answers per training problem in the SFT data
    sft_iters: int = 500
    sft_lr: float = 2e-3
    sft_micro_batch_size: int = 16
    grpo_iters: int = 150
    grpo_lr: float = 5e-5
    group_size: int = 8
    prompts_per_step: int = 8
    max_new_tokens: int = 40
    grpo_heldout: int = 64  # of GRPO's prompts, held out of its training for the in-run curve
    log_interval: int = 10
    eval_interval: int = 50
    seed: int = 1234

    @classmethod
    def fast(cls) -> "RLSettings":
        """A smoke run: the same steps, far fewer iterations (it does not reach the full run's scores)."""
        return cls(sft_iters=60, grpo_iters=10, log_interval=5, eval_interval=10)


def run_rl(output_dir: str, settings: RLSettings, overwrite: bool = False) -> Path:
    from tinyllm_mcore.quickstart.rl_task import write_task_files

    root = Path(output_dir).resolve()
    check_steps_import_this_package()
    prepare_run_dir(root, overwrite)
    run = Run(root, settings)
    s = settings
    rl = run.path("rl")
    print(f"tinyllm-mcore RL quickstart -> {root}\n{s}", flush=True)

    files = write_task_files(run.path("data"), rl, seed=s.seed, teacher_samples=s.teacher_samples)
    print(f"    task files: {', '.join(str(p) for p in files.values())}", flush=True)

    tokenizer = run.path("tokenizer")
    run_step(run, "tokenizer", python(
        "-m", "tinyllm_mcore.cli.train_tokenizer", "--input", str(files["tokenizer"]), "--output-dir", str(tokenizer),
        "--vocab-size", str(tokenizer_vocab_size(files["tokenizer"])), "--character-coverage", "1.0"))

    def common(stage: str, iters: int, lr: float, min_lr: float) -> list[str]:
        return ["--model-size", s.model_size, "--tokenizer-model", str(tokenizer), "--seq-length", str(s.seq_length),
                "--train-iters", str(iters), "--lr", str(lr), "--min-lr", str(min_lr),
                "--log-interval", str(s.log_interval), "--seed", str(s.seed),
                "--save", str(run.path("checkpoints", stage)), "--tensorboard-dir", str(run.path("tensorboard", stage)),
                "--metrics-jsonl", str(run.path("metrics", f"{stage}.jsonl"))]

    sft_ckpt, grpo_ckpt = run.path("checkpoints", "sft"), run.path("checkpoints", "grpo")
    run_step(run, "sft", torchrun(s.data_parallel, "tinyllm_mcore.stages.sft",
                                  *common("sft", s.sft_iters, s.sft_lr, s.sft_lr / 10),
                                  "--sft-data", str(files["sft"]), "--micro-batch-size", str(s.sft_micro_batch_size),
                                  "--split", "95,5,0", "--eval-interval", str(s.sft_iters), "--eval-iters", "2"))
    export(run, "export_sft", sft_ckpt, rl / "hf_sft", tokenizer)

    rows = s.prompts_per_step * s.group_size
    run_step(run, "grpo", torchrun(s.data_parallel, "tinyllm_mcore.stages.grpo",
                                   *common("grpo", s.grpo_iters, s.grpo_lr, s.grpo_lr),
                                   "--load", str(sft_ckpt), "--finetune", "--prompts", str(files["prompts"]),
                                   "--heldout-size", str(s.grpo_heldout), "--system-prompt", "",
                                   "--group-size", str(s.group_size), "--max-new-tokens", str(s.max_new_tokens),
                                   "--global-batch-size", str(rows), "--micro-batch-size", str(rows // s.data_parallel),
                                   "--eval-interval", str(s.eval_interval)))
    export(run, "export_grpo", grpo_ckpt, rl / "hf_grpo", tokenizer)

    run_step(run, "evaluate", python(
        "-m", "tinyllm_mcore.quickstart.rl_eval", "--eval-data", str(files["eval"]),
        "--model", f"sft={rl / 'hf_sft'}", "--model", f"grpo={rl / 'hf_grpo'}",
        "--max-new-tokens", str(s.max_new_tokens), "--output-json", str(rl / "eval.json")))

    report = write_report(root)
    print(f"\nreport: {report}\n{summary_line(root)}", flush=True)
    return report


def export(run: Run, name: str, checkpoint: Path, out: Path, tokenizer: Path) -> None:
    run_step(run, name, python("-m", "tinyllm_mcore.cli.mcore_to_hf", "--load", str(checkpoint), "--save", str(out),
                               "--tokenizer-model", str(tokenizer), "--quiet"))


# ---------------------------------------------------------------------------------------------------------------
# Report


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_reward_curve(records: list[dict], out: Path) -> Path | None:
    """GRPO's training reward and sampled accuracy per log interval, and greedy accuracy on its held-out prompts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("split") == "train" and "reward mean" in r]
    valid = [r for r in records if r.get("split") == "valid" and "heldout accuracy" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["iteration"] for r in train]
    ax.plot(steps, [r["reward mean"] for r in train], label="reward mean (sampled, training prompts)")
    ax.fill_between(steps, [r["reward mean"] - r["reward std"] for r in train],
                    [r["reward mean"] + r["reward std"] for r in train], alpha=0.15)
    ax.plot(steps, [r["zero-variance groups"] for r in train], ":", label="zero-variance groups")
    if valid:
        ax.plot([r["iteration"] for r in valid], [r["heldout accuracy"] for r in valid], "o--",
                label="greedy accuracy, GRPO's held-out prompts")
    ax.set(xlabel="GRPO iteration", ylim=(-0.02, 1.02), title="GRPO reward")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_report(root: Path) -> Path:
    from tinyllm_mcore.quickstart.rl_task import CARELESS, EVAL_SIZE

    run = json.loads((root / "run.json").read_text(encoding="utf-8"))
    s = run["settings"]
    scores = json.loads((root / "rl" / "eval.json").read_text(encoding="utf-8"))
    sft, grpo = scores["sft"], scores["grpo"]
    records = read_jsonl(root / "metrics" / "grpo.jsonl")
    png = plot_reward_curve(records, root / "rl" / "reward_curve.png")
    train = [r for r in records if r.get("split") == "train"]
    total = sum(step["seconds"] for step in run["steps"])
    lines = [
        "# tinyllm-mcore RL quickstart report", "",
        f"Model `{s['model_size']}`, SFT then GRPO at DP={s['data_parallel']} (gloo); total time {total:.0f} s.", "",
        "## RL (GRPO)", "",
        "Task: `计算 a+b+c` with one-digit terms, answered in two worked lines and `<answer>…</answer>`. The SFT "
        f"teacher's lines are always right but its answer tag restates the first partial sum with probability "
        f"{CARELESS['above 3']} when the last term is above 3 and {CARELESS['1-3']} otherwise. GRPO: "
        f"{s['prompts_per_step']} prompts × {s['group_size']} samples per step, reward 1 for an exact final answer, "
        f"{s['grpo_iters']} steps at lr {s['grpo_lr']:g}.", "",
        f"Held-out accuracy ({sft['total']} problems in neither SFT's nor GRPO's data, `rl/eval.jsonl`; transformers "
        "greedy decoding of the HF exports; right when the last integer in the answer equals the answer):", "",
        "| model | held-out accuracy |", "|---|---|",
        f"| SFT (`rl/hf_sft`) | {sft['accuracy']:.1%} ({sft['correct']}/{sft['total']}) |",
        f"| GRPO (`rl/hf_grpo`) | {grpo['accuracy']:.1%} ({grpo['correct']}/{grpo['total']}) |", "",
        f"Change: {100 * (grpo['accuracy'] - sft['accuracy']):+.1f} points.", ""]
    if train:
        lines += [f"Training reward (sampled): {train[0]['reward mean']:.3f} at iteration {train[0]['iteration']} → "
                  f"{train[-1]['reward mean']:.3f} at {train[-1]['iteration']}; zero-variance groups "
                  f"{train[0]['zero-variance groups']:.0%} → {train[-1]['zero-variance groups']:.0%}.", ""]
    if png:
        lines += [f"![GRPO reward]({png.relative_to(root)})", ""]
    lines += ["Sample answers (first held-out problems):", "", "| question | SFT | GRPO |", "|---|---|---|"]
    for a, b in zip(sft["samples"], grpo["samples"]):
        def cell(x):
            return x["response"].replace("\n", " ⏎ ").replace("|", "\\|") + (" ✓" if x["correct"] else " ✗")
        lines.append(f"| {a['question']} (= {a['answer']}) | {cell(a)} | {cell(b)} |")
    lines += ["", "## Steps and timings", "", "| step | time | log |", "|---|---|---|"]
    lines += [f"| {step['name']} | {step['seconds']:.1f} s | {step['log'] or '-'} |" for step in run["steps"]]
    lines += ["", f"Held-out set size: {EVAL_SIZE}. Checkpoints: `{root / 'checkpoints'}`; metrics: "
              f"`{root / 'metrics'}`; TensorBoard: `tensorboard --logdir {root / 'tensorboard'}`.", ""]
    return atomic_write_text(root / "report.md", "\n".join(lines))


def summary_line(root: Path) -> str:
    scores = json.loads((Path(root) / "rl" / "eval.json").read_text(encoding="utf-8"))
    sft, grpo = scores["sft"]["accuracy"], scores["grpo"]["accuracy"]
    return f"held-out accuracy (transformers greedy): SFT {sft:.1%} -> GRPO {grpo:.1%} ({100 * (grpo - sft):+.1f} points)"


# ---------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=None if Path(sys.argv[0]).name == "tinyllm-quickstart-rl" else "python -m tinyllm_mcore.quickstart.rl",
        allow_abbrev=False,
        description="SFT a tiny model on an unreliable teacher's arithmetic, then GRPO with a verifier, and show the "
                    "held-out accuracy of both HF exports (CPU is fine; a few minutes on 2 cores).")
    p.add_argument("--output-dir", default="quickstart_rl", help="run folder (rl/, checkpoints, logs, report.md)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier quickstart run in --output-dir")
    p.add_argument("--fast", action="store_true", help="a smoke run: same steps, far fewer iterations")
    defaults = RLSettings()
    g = p.add_argument_group("overrides (defaults: the tuned settings)")
    for f in dataclasses.fields(RLSettings):
        g.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)), default=None)
    add_verbose_flag(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    settings = RLSettings.fast() if args.fast else RLSettings()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(RLSettings)
                 if getattr(args, f.name) is not None}
    settings = dataclasses.replace(settings, **overrides)
    if settings.data_parallel < 1 or (settings.prompts_per_step * settings.group_size) % settings.data_parallel:
        print("error: --prompts-per-step x --group-size must split evenly over --data-parallel ranks", file=sys.stderr)
        return 2
    return exit_status(lambda: run_rl(args.output_dir, settings, overwrite=args.overwrite))


if __name__ == "__main__":
    raise SystemExit(main())
