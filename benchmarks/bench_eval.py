"""ppl-mode multiple-choice throughput (questions/s) on the 92m preset, CPU: ours vs lm-evaluation-harness on the same
HF export and the same CMMLU questions. Target: ours >= 2x.

    python benchmarks/bench_eval.py [--benchmark-dir ../shared/data/cmmlu --split dev] [--shots 0 5] [--batch-size 16]

The model is the 92m preset with random weights (throughput does not depend on the values), written as the exporter
writes an HF directory (LlamaForCausalLM config + the seed's ChatGLM3 tokenizer). Both sides score the same prompts
(lm-eval's CMMLU template = ours, see tinyllm_mcore/evaluation/lm_eval_compat.py); the script also reports how many
choices agree. lm-eval's time covers its whole simple_evaluate call (task setup from the CSVs included, model loading
excluded, as ours excludes it too).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

SHARED = Path(os.environ.get("TINYLLM_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data"


def build_export(out: Path, tokenizer_model: str, preset_name: str) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tinyllm_mcore.convert.hf_config import hf_config
    from tinyllm_mcore.tokenizer.hf_folder import write_tokenizer_folder
    from tinyllm_mcore.model.presets import get_preset
    from tinyllm_mcore.tokenizer.core import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_model)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**hf_config(get_preset(preset_name, vocab_size=tokenizer.vocab_size)))).save_pretrained(out)
    write_tokenizer_folder(tokenizer, out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--benchmark-dir", default=str(SHARED / "cmmlu"))
    p.add_argument("--split", default="dev")
    p.add_argument("--subjects", nargs="+", help="default: every subject of the split")
    p.add_argument("--shots", type=int, nargs="+", default=[0, 5])
    p.add_argument("--tokenizer-model", default=str(SHARED / "tokenizers" / "chatglm3" / "tokenizer.model"))
    p.add_argument("--model-size", default="92m")
    p.add_argument("--batch-size", type=int, default=16, help="both sides")
    p.add_argument("--hf", help="use this HF directory instead of building a random one")
    args = p.parse_args(argv)
    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"

    import torch
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from tinyllm_mcore.evaluation.lm_eval_compat import write_task_yamls
    from tinyllm_mcore.evaluation.multiple_choice import evaluate_multiple_choice, load_tasks
    from tinyllm_mcore.evaluation.runner import open_hf

    work = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    hf_dir = Path(args.hf) if args.hf else build_export(work / "hf", args.tokenizer_model, args.model_size)
    lm, encoder = open_hf(str(hf_dir))
    their_lm = HFLM(pretrained=str(hf_dir), dtype="float32", device="cpu", batch_size=args.batch_size)
    print(f"model {args.model_size} ({sum(p.numel() for p in lm.model.parameters()) / 1e6:.1f}M params), "
          f"torch threads {torch.get_num_threads()}, batch size {args.batch_size}")
    print("| shots | questions | ours (q/s) | lm-eval (q/s) | speed-up | same choices |")
    print("|---:|---:|---:|---:|---:|---:|")
    for shots in args.shots:
        tasks = load_tasks(args.benchmark_dir, args.split, shots, args.subjects, "cmmlu")
        subjects = [t.subject for t in tasks]
        n = sum(len(t.data.questions) for t in tasks)

        start = time.perf_counter()
        ours = evaluate_multiple_choice(lm, encoder, tasks, batch_size=args.batch_size)
        ours_s = time.perf_counter() - start

        names = write_task_yamls(args.benchmark_dir, subjects, work / f"tasks{shots}", args.split)
        start = time.perf_counter()
        output = evaluator.simple_evaluate(model=their_lm, tasks=names, num_fewshot=shots, log_samples=True,
                                           task_manager=TaskManager(include_path=str(work / f"tasks{shots}")),
                                           verbosity="ERROR")
        theirs_s = time.perf_counter() - start

        same = 0
        for subject, name in zip(subjects, names):
            samples = sorted(output["samples"][name], key=lambda s: s["doc_id"])
            for ours_rec, sample in zip(ours["records"][subject], samples):
                scores = [float(r[0]) for r in sample["filtered_resps"]]
                same += ours_rec["pred"] == "ABCD"[max(range(4), key=lambda j: (scores[j], -j))]
        print(f"| {shots} | {n} | {n / ours_s:.1f} | {n / theirs_s:.1f} | {theirs_s / ours_s:.2f}x | {same}/{n} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
