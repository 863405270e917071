"""Concatenate megatron indexed datasets into one: Megatron-LM's tools/merge_datasets.py flags and output.

    # as typed for Megatron-LM: every .bin/.idx pair in a folder, in sorted prefix order
    python tools/merge_datasets.py --input data/parts/ --output-prefix data/corpus_text_document
    # or named prefixes, in the order given
    python tools/merge_datasets.py --input data/a_text_document data/b_text_document --output-prefix data/ab

Streaming: the .bin files are copied and the .idx written block by block, so memory does not grow with the data
(Megatron-LM's tool holds every sequence length in a Python list). Inputs made with different tokenizers (their
vocabulary sidecars, ``{prefix}.json``, disagree), dtypes or modes are refused; the output gets a sidecar when every
input has one. Atomic: a failure leaves nothing, and a dataset already at the output prefix unchanged.

Exit status: 0 on success, 1 with one `error:` line otherwise.

The same command, three spellings: `tinyllm-merge-datasets` (installed by pip),
`python -m tinyllm_mcore.cli.merge_datasets`, `python tools/merge_datasets.py` (in a checkout).
"""
from __future__ import annotations

import argparse
import os
import sys

from tinyllm_mcore.data.indexed_files import dataset_prefixes_in, merge_datasets
from tinyllm_mcore.runtime.quiet import add_verbose_flag


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="a folder of .bin/.idx pairs (merged in sorted name order), or dataset prefixes in order")
    p.add_argument("--output-prefix", required=True, help="writes {prefix}.bin / .idx (/ .json)")
    p.add_argument("--multimodal", action="store_true", help="Megatron-LM's flag; not supported (text datasets only)")
    add_verbose_flag(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.multimodal:
            raise ValueError("--multimodal is not supported: tinyllm-mcore datasets are text only")
        if len(args.input) == 1 and os.path.isdir(args.input[0]):
            prefixes = dataset_prefixes_in(args.input[0])
        else:
            prefixes = [p[:-4] if p.endswith((".bin", ".idx")) else p for p in args.input]
        totals = merge_datasets(prefixes, args.output_prefix)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"merged {len(prefixes)} datasets: {totals['documents']} documents, {totals['sequences']} sequences, "
          f"{totals['tokens']} tokens -> {args.output_prefix}.bin / .idx")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
