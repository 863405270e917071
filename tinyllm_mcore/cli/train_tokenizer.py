"""Train a SentencePiece BPE tokenizer (seed settings, chat role markers reserved) from jsonl / jsonl.gz / txt /
parquet files, folders or globs.

    python tools/train_tokenizer.py --input corpus/ --output-dir tokenizer/ --vocab-size 20000

The same command, three spellings: `tinyllm-train-tokenizer` (installed by pip),
`python -m tinyllm_mcore.cli.train_tokenizer`, `python tools/train_tokenizer.py` (in a checkout).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter

from tinyllm_mcore.tokenizer.training import train_tokenizer
from tinyllm_mcore.runtime.quiet import add_verbose_flag


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files, folders or globs (jsonl, jsonl.gz, txt, parquet)")
    p.add_argument("--output-dir", required=True, help="writes tokenizer.model and the HF tokenizer files here")
    p.add_argument("--vocab-size", type=int, default=20000)
    p.add_argument("--json-key", default="text", help="text field of jsonl/parquet records")
    p.add_argument("--input-sentence-size", type=int, default=2_000_000,
                   help="sentences SentencePiece samples from the stream (bounds memory)")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--max-sentence-length", type=int, default=24000, help="bytes")
    p.add_argument("--extra-special-tokens", nargs="*", default=[], help="more tokens reserved as single pieces")
    p.add_argument("--normalization", default="identity", help="SentencePiece normalization rule (seed: nmt_nfkc)")
    p.add_argument("--num-threads", type=int, default=None)
    add_verbose_flag(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    skipped = Counter()
    try:
        tokenizer = train_tokenizer(
            args.input, args.output_dir, vocab_size=args.vocab_size, json_key=args.json_key,
            input_sentence_size=args.input_sentence_size, character_coverage=args.character_coverage,
            max_sentence_length=args.max_sentence_length, extra_special_tokens=args.extra_special_tokens,
            normalization=args.normalization, num_threads=args.num_threads, skipped=skipped)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if skipped:
        print(f"warning: skipped {sum(skipped.values())} record(s) or line(s): "
              f"{', '.join(f'{n} {reason}' for reason, n in sorted(skipped.items()))}", file=sys.stderr)
    print(f"wrote {args.output_dir}/tokenizer.model: vocab {tokenizer.vocab_size}, "
          f"special tokens {tokenizer.special_tokens}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
