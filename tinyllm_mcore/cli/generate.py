"""One-shot generation from an mcore checkpoint (any TP: `torchrun --nproc-per-node TP tools/generate.py ...`).

    python tools/generate.py --load ckpt --tokenizer-model tok --prompt "介绍一下中国。" --chat --greedy
    python tools/generate.py --load ckpt --tokenizer-model tok --prompt "从前" --prompt "今天" --max-new-tokens 64

Several --prompt flags generate as one batch. With --chat each prompt is a user message in the seed's chat format
(with the default system prompt unless --system is given); without it the prompt is plain text continued as is.

The same command, three spellings: `tinyllm-generate` (installed by pip),
`python -m tinyllm_mcore.cli.generate`, `python tools/generate.py` (in a checkout).
"""
from __future__ import annotations

import argparse
import json

from tinyllm_mcore.inference import generate as inference
from tinyllm_mcore.runtime.quiet import add_verbose_flag


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    inference.add_generation_args(p)
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn of the chat format")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt (prompt, completion, ids)")
    add_verbose_flag(p)
    return p


def run(args) -> list[str]:
    from tinyllm_mcore.runtime import distributed as rt

    tokenizer, generator = inference.generator_from_args(args)
    if args.chat:
        prompts = [tokenizer.chat_prompt_ids([{"role": "user", "content": p}], system=args.system)
                   for p in args.prompt]
        stops = inference.chat_stop_ids(tokenizer)
    else:
        prompts = [tokenizer.chat_prefix_ids + tokenizer.tokenize(p) for p in args.prompt]
        stops = [tokenizer.eos]
    outputs = generator.generate(prompts, inference.sampling_from_args(args, stops))
    texts = [tokenizer.detokenize(ids, skip_special_tokens=True) for ids in outputs]
    if rt.is_logging_rank():
        for prompt, text, ids in zip(args.prompt, texts, outputs):
            if args.json:
                print(json.dumps({"prompt": prompt, "completion": text, "ids": ids}, ensure_ascii=False), flush=True)
            else:
                print(f"{prompt}\n>>> {text}\n", flush=True)
    return texts


def main(argv=None) -> int:
    from tinyllm_mcore.cli.errors import run_cli

    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())
