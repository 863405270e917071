"""`python -m tinyllm_mcore.quickstart [--output-dir DIR] [--fast] [--corpus PATH]` (or the `tinyllm-quickstart`
console script): the whole pipeline, unattended."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from tinyllm_mcore.quickstart.pipeline import Settings, exit_status, run_pipeline
from tinyllm_mcore.runtime.quiet import add_verbose_flag


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        # `python -m` would show "__main__.py" as the program name
        prog=None if Path(sys.argv[0]).name == "tinyllm-quickstart" else "python -m tinyllm_mcore.quickstart",
        allow_abbrev=False,
        description="Run corpus -> tokenizer -> preprocess -> TP2 pretrain -> SFT -> DPO -> reward model -> "
                    "evaluate -> HF export -> chat on a tiny model (CPU is fine) and write a report.")
    p.add_argument("--output-dir", default="quickstart_run", help="run folder (logs, checkpoints, report.md)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier quickstart run in --output-dir")
    p.add_argument("--fast", action="store_true", help="a smoke run: same steps, far fewer iterations (~2-3 min)")
    p.add_argument("--corpus", default=None,
                   help="your own text for pretraining: jsonl / jsonl.gz / parquet files, folders or globs of them, or "
                        "a datasets save_to_disk folder (whatever tools/preprocess_data.py takes; the \"text\" field), "
                        "read as a stream up to as many characters as the synthetic fact documents it is mixed with "
                        "(SFT/DPO/reward/evaluation stay on the synthetic knowledge data)")
    defaults = Settings()
    g = p.add_argument_group("overrides (defaults: the tuned quickstart settings)")
    for f in dataclasses.fields(Settings):
        if f.name in ("eval_limit", "vocab_size"):
            g.add_argument("--" + f.name.replace("_", "-"), type=int, default=None)
            continue
        g.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)), default=None)
    add_verbose_flag(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings.fast() if args.fast else Settings()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)
                 if getattr(args, f.name) is not None}
    settings = dataclasses.replace(settings, **overrides)
    return exit_status(lambda: run_pipeline(args.output_dir, settings, corpus=args.corpus, overwrite=args.overwrite))


if __name__ == "__main__":
    raise SystemExit(main())
