"""The quickstart's report: a loss-curve PNG per training stage (from the JSONL metrics the loop writes) and
RUN/report.md with accuracies, timings and artifact paths. Works on any finished (or partial) run folder:

    python -m tinyllm_mcore.quickstart.report RUN
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

STAGES = ("pretrain", "sft", "dpo")
MODELS = ("pretrained", "sft", "dpo")
SPLIT_TITLES = {"heldout_phrasing": "held-out phrasings (facts taught in SFT)",
                "unseen_fact": "unseen facts (pretraining only)", "all": "all"}


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_stage(records: list[dict], stage: str, out: Path) -> Path | None:
    """Loss (train and validation) against iteration, plus any accuracy-like metric in a second panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("split") == "train"]
    valid = [r for r in records if r.get("split") == "valid"]
    if not train:
        return None
    loss_keys = [k for k in train[0] if "loss" in k]
    extra_keys = [k for k in train[0] if "acc" in k or "margin" in k]
    panels = 2 if extra_keys else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    ax = axes[0][0]
    for key in loss_keys:
        ax.plot([r["iteration"] for r in train], [r[key] for r in train], label=f"train {key}")
        points = [r for r in valid if key in r]
        if points:
            ax.plot([r["iteration"] for r in points], [r[key] for r in points], "o--", label=f"valid {key}")
    ax.set(xlabel="iteration", ylabel="loss", title=f"{stage} loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if extra_keys:
        ax = axes[0][1]
        for key in extra_keys:
            ax.plot([r["iteration"] for r in train], [r[key] for r in train], label=key)
        ax.set(xlabel="iteration", title=f"{stage} metrics")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def accuracy_table(evaluation: dict) -> list[str]:
    splits = [s for s in ("heldout_phrasing", "unseen_fact", "all")
              if any(s in evaluation.get(m, {}).get("scores", {}) for m in MODELS)]
    lines = ["| model | " + " | ".join(SPLIT_TITLES[s] for s in splits) + " |",
             "|---|" + "---|" * len(splits)]
    for model in MODELS:
        if model not in evaluation:
            continue
        scores = evaluation[model]["scores"]
        cells = [f"{scores[s]['accuracy']:.1%} ({scores[s]['correct']}/{scores[s]['total']})" if s in scores else "-"
                 for s in splits]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return lines


def write_report(root: str | Path) -> Path:
    root = Path(root)
    run = json.loads((root / "run.json").read_text(encoding="utf-8"))
    evaluation = json.loads((root / "eval.json").read_text(encoding="utf-8")) if (root / "eval.json").is_file() else {}
    chat = json.loads((root / "chat.json").read_text(encoding="utf-8")) if (root / "chat.json").is_file() else []
    total = sum(s["seconds"] for s in run["steps"])

    lines = ["# tinyllm-mcore quickstart report", ""]
    lines += [f"Corpus: {'synthetic Chinese knowledge corpus' if not run['corpus'] else run['corpus'] + ' (pretraining) + synthetic SFT/DPO/eval'}; "
              f"model `{run['settings']['model_size']}` at TP={run['settings']['tensor_parallel']}; "
              f"total time {_fmt_seconds(total)}.", ""]
    if evaluation:
        lines += ["## Held-out exact match", "",
                  "Greedy answers in the chat format, compared verbatim (whitespace aside) with the reference sentence. "
                  "The questions use phrasings that appear in no training data.", ""]
        lines += accuracy_table(evaluation) + [""]
        examples = evaluation.get("dpo", evaluation.get("sft", {})).get("examples", [])[:4]
        if examples:
            lines += ["Examples (final model):", ""] + [
                f"- {e['question']} → {e['prediction']}" + ("" if e["prediction"] == e["answer"] else
                                                         f" (expected {e['answer']})") for e in examples] + [""]
    if chat:
        lines += ["## Chat with the Hugging Face export", ""] + [
            f"- **user:** {c['question']}  \n  **assistant:** {c['answer']} {'✓' if c['correct'] else '✗ (expected ' + c['reference'] + ')'}"
            for c in chat] + [""]

    lines += ["## Training", ""]
    rows = ["| stage | iterations | first loss | final loss | final valid loss | tokens/s | curve |", "|---|---|---|---|---|---|---|"]
    for stage in STAGES:
        records = read_metrics(root / "metrics" / f"{stage}.jsonl")
        train = [r for r in records if r.get("split") == "train"]
        valid = [r for r in records if r.get("split") == "valid"]
        if not train:
            continue
        key = next(k for k in train[0] if "loss" in k)
        png = plot_stage(records, stage, root / "plots" / f"{stage}_loss.png")
        rel = png.relative_to(root) if png else None
        final_valid = f"{valid[-1][key]:.3f}" if valid and key in valid[-1] else "-"
        rows.append(f"| {stage} | {train[-1]['iteration']} | {train[0][key]:.3f} | {train[-1][key]:.3f} | "
                    f"{final_valid} | {train[-1].get('tokens_per_s', float('nan')):,.0f} | ![{stage}]({rel}) |")
    lines += rows + [""]

    lines += ["## Steps and timings", "", "| step | time | log |", "|---|---|---|"]
    lines += [f"| {s['name']} | {_fmt_seconds(s['seconds'])} | {s['log'] or '-'} |" for s in run["steps"]]
    lines += [f"| **total** | **{_fmt_seconds(total)}** | |", ""]

    artifacts = [("corpus (jsonl)", "corpus"), ("tokenizer", "tokenizer"), ("indexed datasets", "data"),
                 ("checkpoints (megatron dist)", "checkpoints"), ("Hugging Face export", "hf"),
                 ("TensorBoard events", "tensorboard"), ("metrics (JSONL)", "metrics"), ("loss curves", "plots"),
                 ("evaluation", "eval.json"), ("logs", "logs")]
    lines += ["## Artifacts", ""] + [f"- {what}: `{root / rel}`" for what, rel in artifacts if (root / rel).exists()]
    lines += ["", f"TensorBoard: `tensorboard --logdir {root / 'tensorboard'}`",
              f"Chat: `python tools/chat.py --load {root / 'checkpoints' / 'dpo'} --tokenizer-model {root / 'tokenizer'}`",
              ""]
    out = root / "report.md"
    out.write_text("\n".join(lines), encoding="utf-8")
    return out


def summary_line(root: str | Path) -> str:
    root = Path(root)
    path = root / "eval.json"
    if not path.is_file():
        return "no evaluation results"
    evaluation = json.loads(path.read_text(encoding="utf-8"))
    parts = []
    for model in MODELS:
        scores = evaluation.get(model, {}).get("scores", {})
        split = "heldout_phrasing" if "heldout_phrasing" in scores else "all"
        if split in scores:
            parts.append(f"{model} {scores[split]['accuracy']:.1%}")
    return "held-out exact match: " + ", ".join(parts)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not (Path(args[0]) / "run.json").is_file():
        print("usage: python -m tinyllm_mcore.quickstart.report RUN_DIR (a folder with run.json)", file=sys.stderr)
        return 2
    print(write_report(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
