"""Evaluate an mcore checkpoint (any TP/PP, under torchrun) or a Hugging Face export.

Multiple choice on CMMLU / C-Eval CSV folders (ppl or gen mode, zero- or k-shot)::

    python tools/evaluate.py --hf out/hf --benchmark-dir data/cmmlu --split test --shots 5 --output-json r.json
    torchrun --nproc-per-node 2 tools/evaluate.py --load ckpt --tokenizer-model tok --tensor-model-parallel-size 2 \\
        --benchmark-dir data/ceval --split val --mode gen

Perplexity on held-out data (megatron indexed prefixes or jsonl)::

    python tools/evaluate.py --load ckpt --tokenizer-model tok --data-path data/valid_text_document --seq-length 512
    python tools/evaluate.py --hf out/hf --jsonl held_out.jsonl

Results go to stdout (a markdown table / a JSON line), --output-json and --output-md.

The same command, three spellings: `tinyllm-evaluate` (installed by pip),
`python -m tinyllm_mcore.cli.evaluate`, `python tools/evaluate.py` (in a checkout).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tinyllm_mcore.checkpoint.io import add_load_check_flags
from tinyllm_mcore.runtime.quiet import add_verbose_flag



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    model = p.add_argument_group("model (one of --load, --hf)")
    model.add_argument("--load", help="mcore checkpoint (save root or iter_* dir)")
    model.add_argument("--hf", help="Hugging Face model directory (an export)")
    model.add_argument("--tokenizer-model", help="SentencePiece model / tokenizer dir (required with --load; with "
                                                 "--hf it replaces the directory's AutoTokenizer)")
    model.add_argument("--tokenizer-type", default="auto")
    model.add_argument("--tensor-model-parallel-size", type=int, default=1)
    model.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    model.add_argument("--bf16", action="store_true")
    model.add_argument("--no-prompt-prefix", action="store_true",
                       help="encode prompts without the tokenizer's prefix tokens ([gMASK] sop / <s>)")
    add_load_check_flags(model)

    mc = p.add_argument_group("multiple choice (CMMLU / C-Eval)")
    mc.add_argument("--benchmark-dir", help="folder with dev/ and test/ (CMMLU) or dev/ val/ test/ (C-Eval) CSVs")
    mc.add_argument("--benchmark", choices=["cmmlu", "ceval"], help="default: detected from the file names")
    mc.add_argument("--split", default="test", help="split folder to score (CMMLU: test, C-Eval: val)")
    mc.add_argument("--shots", type=int, default=0, help="k-shot with the first k dev questions")
    mc.add_argument("--mode", choices=["ppl", "gen"], default="ppl")
    mc.add_argument("--subjects", nargs="+", help="only these subjects")
    mc.add_argument("--max-new-tokens", type=int, default=16, help="gen mode answer length")

    ppl = p.add_argument_group("perplexity")
    ppl.add_argument("--data-path", nargs="+", help="megatron indexed dataset prefixes")
    ppl.add_argument("--jsonl", nargs="+", help="jsonl files of held-out text")
    ppl.add_argument("--json-key", default="text")
    ppl.add_argument("--seq-length", type=int, help="window length (default: the model's maximum)")
    ppl.add_argument("--max-tokens", type=int, help="stop after about this many predicted tokens")

    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward")
    p.add_argument("--output-json")
    p.add_argument("--output-md")
    add_verbose_flag(p)
    return p


def run(args) -> dict:
    from tinyllm_mcore.evaluation import runner

    if bool(args.load) == bool(args.hf):
        raise ValueError("give exactly one of --load (mcore checkpoint) or --hf (Hugging Face directory)")
    tasks_given = [bool(args.benchmark_dir), bool(args.data_path or args.jsonl)]
    if sum(tasks_given) != 1:
        raise ValueError("give --benchmark-dir (multiple choice) or --data-path / --jsonl (perplexity)")
    if args.shots < 0 or args.batch_size < 1:
        raise ValueError("--shots must be >= 0 and --batch-size >= 1")
    if args.max_new_tokens < 1:  # gen mode would score an empty answer as wrong for every question
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    add_prefix = not args.no_prompt_prefix
    if args.benchmark_dir:  # read the data before loading a model: bad input fails fast
        from tinyllm_mcore.evaluation.multiple_choice import load_tasks

        tasks = load_tasks(args.benchmark_dir, args.split, args.shots, args.subjects, args.benchmark)
    if args.hf:
        lm, encoder = runner.open_hf(args.hf, tokenizer_model=args.tokenizer_model,
                                     tokenizer_type=args.tokenizer_type, add_prefix=add_prefix, bf16=args.bf16)
    else:
        lm, encoder = runner.open_mcore(args.load, args.tokenizer_model, tokenizer_type=args.tokenizer_type,
                                        tensor_parallel_size=args.tensor_model_parallel_size,
                                        pipeline_parallel_size=args.pipeline_model_parallel_size,
                                        add_prefix=add_prefix, bf16=args.bf16,
                                        allow_tokenizer_change=args.allow_tokenizer_change,
                                        verify=not args.no_verify_checkpoint, require_manifest=args.require_manifest)

    if args.benchmark_dir:
        from tinyllm_mcore.evaluation.multiple_choice import evaluate_multiple_choice, markdown_table

        result = evaluate_multiple_choice(lm, encoder, tasks, mode=args.mode, batch_size=args.batch_size,
                                          max_new_tokens=args.max_new_tokens)
        markdown = markdown_table(result)
        if runner.is_writer():
            for task in tasks:
                if task.data.skipped:
                    reasons = ", ".join(f"{n} {r}" for r, n in task.data.skipped.items())
                    print(f"warning: {task.data.path}: skipped {sum(task.data.skipped.values())} malformed row(s) "
                          f"({reasons}; lines {', '.join(str(l) for l, _ in task.data.skipped_rows[:10])})",
                          file=sys.stderr)
            print(markdown)
            speed = result["speed"]
            print(f"{speed['questions']} questions in {speed['seconds']:.1f} s "
                  f"({speed['questions_per_second']:.1f} questions/s)")
        runner.write_results(result, args.output_json, args.output_md, markdown)
        return result

    from tinyllm_mcore.evaluation import perplexity

    skipped: dict = {}
    if args.data_path:
        documents = perplexity.indexed_documents(args.data_path)
    else:
        for path in args.jsonl:
            if not Path(path).is_file():
                raise FileNotFoundError(f"jsonl file not found: {path}")
        documents = perplexity.jsonl_documents(args.jsonl, encoder.encode_plain, encoder.eos_id, args.json_key,
                                               skipped)
    result = perplexity.evaluate_perplexity(lm, documents, seq_length=args.seq_length,
                                            batch_size=min(args.batch_size, 8), max_tokens=args.max_tokens)
    result["skipped_lines"] = skipped.get("bad line", 0)
    if runner.is_writer():
        print(json.dumps(result))
    runner.write_results(result, args.output_json)
    return result


def main(argv=None) -> int:
    from tinyllm_mcore.cli.errors import run_cli

    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())
