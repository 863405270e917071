"""The quickstart's report: a loss-curve PNG per training stage (from the JSONL metrics the loop writes) and
RUN/report.md with the held-out evaluation (facts, answer style, preference pairs), timings and artifact paths.
Works on any finished (or partial) run folder:

    python -m tinyllm_mcore.quickstart.report RUN
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from tinyllm_mcore.runtime.files import atomic_write_text

STAGES = ("pretrain", "sft", "dpo", "reward")
MODELS = ("pretrained", "sft", "dpo")
SPLITS = ("heldout_phrasing", "no_preference_fact", "unseen_fact")
SPLIT_TITLES = {"heldout_phrasing": "held-out phrasings", "no_preference_fact": "facts in no preference pair",
                "unseen_fact": "unseen facts (pretraining only)", "all": "all"}
HEADLINE = "heldout_phrasing"


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
            line, = ax.plot([r["iteration"] for r in train], [r[key] for r in train], label=f"train {key}")
            points = [r for r in valid if key in r]
            if points:
                ax.plot([r["iteration"] for r in points], [r[key] for r in points], "o--", color=line.get_color(),
                        label=f"valid {key}")
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


def _pct(value) -> str:
    return "-" if value is None else f"{value:.1%}"


def model_table(evaluation: dict) -> list[str]:
    """Pretrained / SFT / DPO on the held-out questions: fact (style-aware exact match) and preferred-style rate per
    split, and DPO's implicit-reward accuracy on the held-out preference pairs."""
    models = evaluation.get("models", {})
    splits = [s for s in SPLITS if any(s in models.get(m, {}).get("scores", {}) for m in MODELS)]
    pairs = evaluation.get("dpo_heldout_pairs", {})
    lines = ["| model | " + " | ".join(f"fact: {SPLIT_TITLES[s]} | full-sentence style: {SPLIT_TITLES[s]}"
                                       for s in splits) + " | DPO held-out rewards/accuracy (style / fact pairs) |",
             "|---|" + "---|---|" * len(splits) + "---|"]
    for model in MODELS:
        if model not in models:
            continue
        scores = models[model]["scores"]
        cells = []
        for split in splits:
            sc = scores.get(split)
            cells += [f"{sc['accuracy']:.1%} ({sc['correct']}/{sc['total']})" if sc else "-",
                      f"{sc['preferred_style_rate']:.1%}" if sc else "-"]
        reward_cell = "-"
        if pairs and model == pairs.get("policy"):
            summary = pairs["summary"]
            reward_cell = " / ".join(_pct(summary.get(kind, {}).get("all", {}).get("accuracy"))
                                     for kind in ("style", "fact"))
        elif pairs and model == pairs.get("reference"):
            reward_cell = "(reference)"
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {reward_cell} |")
    return lines


def pairs_table(summary: dict, score_name: str) -> list[str]:
    lines = ["| pairs | " + " | ".join(SPLIT_TITLES[s] for s in (*SPLITS, "all")) + " |",
             "|---|" + "---|" * (len(SPLITS) + 1)]
    for kind in ("style", "fact", "all"):
        if kind not in summary:
            continue
        cells = [f"{c['accuracy']:.1%} ({score_name} {c['mean_margin']:+.2f}, {c['pairs']} pairs)"
                 if (c := summary[kind].get(split)) else "-" for split in (*SPLITS, "all")]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return lines


def headline(evaluation: dict) -> dict:
    """The numbers the quickstart is judged by: held-out phrasings of facts in preference pairs (the reward model
    cannot know facts no pair taught it; the report's tables show every split)."""
    models = evaluation.get("models", {})
    out = {}
    for model in MODELS:
        sc = models.get(model, {}).get("scores", {}).get(HEADLINE)
        if sc:
            out[f"{model} fact"] = sc["accuracy"]
            out[f"{model} style"] = sc["preferred_style_rate"]
    pairs = evaluation.get("dpo_heldout_pairs", {}).get("summary", {})
    if HEADLINE in pairs.get("all", {}):
        out["dpo pair accuracy"] = pairs["all"][HEADLINE]["accuracy"]
    reward = evaluation.get("reward_model", {})
    if HEADLINE in reward.get("heldout_pairs", {}).get("all", {}):
        out["reward model accuracy"] = reward["heldout_pairs"]["all"][HEADLINE]["accuracy"]
        if reward.get("dpo_vs_sft", {}).get("policy_win_rate") is not None:
            out["reward model prefers dpo"] = reward["dpo_vs_sft"]["policy_win_rate"]
    return out


def write_report(root: str | Path) -> Path:
    root = Path(root)
    run = json.loads((root / "run.json").read_text(encoding="utf-8"))
    evaluation = json.loads((root / "eval.json").read_text(encoding="utf-8")) if (root / "eval.json").is_file() else {}
    chat = json.loads((root / "chat.json").read_text(encoding="utf-8")) if (root / "chat.json").is_file() else []
    total = sum(s["seconds"] for s in run["steps"])

    lines = ["# tinyllm-mcore quickstart report", ""]
    used = run.get("corpus_used")
    corpus = "synthetic Chinese knowledge corpus" if not used else (
        f"`{used['path']}` ({used['documents']} documents, {used['characters']:,} characters"
        f"{', read up to the budget' if used['truncated'] else ''}) mixed with the synthetic fact documents for "
        f"pretraining; synthetic SFT / DPO / evaluation data")
    lines += [f"Corpus: {corpus}; model `{run['settings']['model_size']}` at TP={run['settings']['tensor_parallel']}; "
              f"total time {_fmt_seconds(total)}.", ""]
    models = evaluation.get("models", {})
    if models:
        lines += ["## Held-out evaluation", "",
                  "Greedy answers in the chat format to questions in phrasings no training split contains. SFT saw "
                  "every training question answered both as a full sentence that starts with the entity and as the "
                  "bare value; DPO pairs prefer the full sentence (and the correct fact over a wrong one). *fact*: "
                  "exact match with the reference in either style; *full-sentence style*: the share of answers in "
                  "the preferred style. The last column is DPO's implicit reward (β·log-ratio to the SFT model) "
                  "ranking the chosen answer first on held-out pairs.", ""]
        lines += model_table(evaluation) + [""]
        pairs = evaluation.get("dpo_heldout_pairs")
        if pairs:
            lines += [f"DPO's implicit reward on the held-out pairs (accuracy, mean margin; policy "
                      f"`{pairs['policy']}`, reference `{pairs['reference']}`, β {pairs['beta']}):", ""]
            lines += pairs_table(pairs["summary"], "margin") + [""]
        examples = models.get("dpo", models.get("sft", {})).get("examples", [])[:4]
        if examples:
            lines += ["Examples (final model):", ""] + [
                f"- {e['question']} → {e['prediction']}" + ("" if e["prediction"] == e["answer"] else
                                                         f" (reference {e['answer']})") for e in examples] + [""]
    reward = evaluation.get("reward_model")
    if reward:
        lines += ["## Reward model", "",
                  "Trained on the DPO pairs from the SFT checkpoint's trunk (`tinyllm_mcore.stages.reward`); scored on the "
                  "held-out pairs (accuracy: chosen scored above rejected; gap: mean score difference):", ""]
        lines += pairs_table(reward["heldout_pairs"], "gap") + [""]
        ranking = reward.get("dpo_vs_sft")
        if ranking:
            lines += [f"On the {ranking['questions']} held-out questions it scores the DPO model's greedy answer above "
                      f"the SFT model's {ranking['policy_preferred']} times and below it "
                      f"{ranking['reference_preferred']} times ({ranking['same_answer']} identical answers): DPO "
                      f"preferred in {_pct(ranking['policy_win_rate'])} of the questions where they differ.", ""]
    if chat:
        lines += ["## Chat with the Hugging Face export", ""] + [
            f"- **user:** {c['question']}  \n  **assistant:** {c['answer']} "
            f"{'✓' if c['correct'] else '✗ (reference ' + c['reference'] + ')'}"
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
              f"Chat: `tinyllm-chat --load {root / 'checkpoints' / 'dpo'} --tokenizer-model {root / 'tokenizer'}`",
              ""]
    out = root / "report.md"
    return atomic_write_text(out, "\n".join(lines))


def summary_line(root: str | Path) -> str:
    path = Path(root) / "eval.json"
    if not path.is_file():
        return "no evaluation results"
    h = headline(json.loads(path.read_text(encoding="utf-8")))
    parts = [", ".join(f"{m} {h[f'{m} fact']:.1%}" for m in MODELS if f"{m} fact" in h),
             "full-sentence style " + ", ".join(f"{m} {h[f'{m} style']:.1%}" for m in MODELS if f"{m} style" in h)]
    if "dpo pair accuracy" in h:
        parts.append(f"DPO pair accuracy {h['dpo pair accuracy']:.1%}")
    if "reward model accuracy" in h:
        parts.append(f"reward model pair accuracy {h['reward model accuracy']:.1%}")
    if "reward model prefers dpo" in h:
        parts.append(f"reward model prefers DPO's answer {h['reward model prefers dpo']:.1%}")
    return f"{SPLIT_TITLES[HEADLINE]}: facts " + "; ".join(parts)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not (Path(args[0]) / "run.json").is_file():
        print("usage: python -m tinyllm_mcore.quickstart.report RUN_DIR (a folder with run.json)", file=sys.stderr)
        return 2
    print(write_report(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
