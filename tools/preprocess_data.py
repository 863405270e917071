"""Tokenize a corpus into megatron-core indexed datasets (Megatron-LM's flags and output names).

    python tools/preprocess_data.py --input corpus/*.jsonl.gz --output-prefix data/corpus \\
        --tokenizer-model tokenizer.model --append-eod --workers 8
    # -> data/corpus_text_document.bin / .idx, usable as --data-path data/corpus_text_document

    python tools/preprocess_data.py --mode sft --input sft.jsonl --output-prefix data/sft --tokenizer-model ...
    # -> data/sft_sft_document.bin / .idx (see tinyllm_mcore/data/preprocess.py for the layout)

Exit status: 0 on success (malformed lines are counted in the summary, not fatal), 1 for bad paths or arguments,
130 when interrupted (no output is left behind).
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tinyllm_mcore.data.preprocess import MODES, preprocess  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = p.add_argument_group("input data")
    group.add_argument("--input", nargs="+", required=True,
                       help="jsonl / jsonl.gz / parquet files, folders or globs of them, or a datasets save_to_disk dir")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract (pretrain mode)")
    group.add_argument("--mode", choices=MODES, default="pretrain",
                       help="pretrain: text documents; sft: question/answer or messages; preference: prompt/chosen/"
                            "rejected")
    group.add_argument("--system", default=None, help="chat system text for sft/preference (default: the seed's)")
    group = p.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-model", required=True, help="tokenizer.model or a directory holding one")
    group.add_argument("--tokenizer-type", default="auto",
                       help="auto (detect), sentencepiece, chatglm3, added_tokens; Megatron-LM's SentencePiece type "
                            "names mean auto")
    group.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")
    group = p.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx")
    group = p.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    group.add_argument("--chunk-size", type=int, default=512, help="records per task sent to a worker")
    group.add_argument("--log-interval", type=int, default=1000, help="progress bar update interval (lines)")
    group.add_argument("--no-progress", action="store_true", help="no progress bar (summary only)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = preprocess(args.input, args.output_prefix, args.tokenizer_model, tokenizer_type=args.tokenizer_type,
                            json_keys=args.json_keys, append_eod=args.append_eod, mode=args.mode,
                            workers=args.workers, chunk_size=args.chunk_size, system=args.system,
                            log_interval=args.log_interval, progress=not args.no_progress)
    except (FileNotFoundError, NotADirectoryError, ValueError, EOFError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 130
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
