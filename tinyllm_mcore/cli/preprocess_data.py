"""Tokenize a corpus into megatron-core indexed datasets: Megatron-LM's (core_v0.16.1) flags, meanings and files.

    # as typed for Megatron-LM's tools/preprocess_data.py
    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tokenizer.model --json-keys text \\
        --append-eod --workers 8 --partitions 2
    # -> data/corpus_text_document.bin / .idx (+ .json, the vocabulary sidecar), --data-path data/corpus_text_document

    # shorter: the tokenizer kind is detected (a tokenizer.model, or a folder with tokenizer.json)
    python tools/preprocess_data.py --input corpus/*.jsonl.gz --output-prefix data/corpus \\
        --tokenizer-model tokenizer/ --append-eod --workers 8

    python tools/preprocess_data.py --mode sft --input sft.jsonl --output-prefix data/sft --tokenizer-model ...
    # -> data/sft_sft_document.bin / .idx (see tinyllm_mcore/data/preprocess.py for the layout)

Beyond Megatron-LM: --input takes .jsonl.gz, parquet, folders, globs and datasets folders; lines Megatron-LM would
stop on (bad JSON, a missing key) are counted instead (with several --json-keys, a line missing one key is written
as an empty document in that key's output only); --mode sft|preference. --split-sentences --lang chinese splits
Chinese text (tinyllm_mcore/data/sentences.py); other --lang values use nltk's punkt data.

Where Megatron-LM core_v0.16.1 differs from its own documented meaning, the meaning is kept: with several --json-keys
it writes the .idx of the last key only (here every key gets its pair); with --split-sentences and one partition it
stops after writing the split-sentence jsonl (here the sentence-level dataset is written); its --partitions leaves
part files beside the input and reuses them on the next run (here parts are temporary, beside the output).

Lines that are not valid UTF-8 are dropped and counted (invalid_utf8 in the summary); --strict-utf8 makes the first
one an error naming its file:line. A worker process that dies, or holds a chunk past --worker-timeout, ends the run
with an error instead of a wait without end.

Exit status: 0 on success, 1 for bad paths or arguments, input that yields no tokens or a failed worker (one `error:`
line; nothing is written and a dataset already at the prefix is left as it was), 130 on Ctrl-C, 143 on SIGTERM.

The same command, three spellings: `tinyllm-preprocess-data` (installed by pip),
`python -m tinyllm_mcore.cli.preprocess_data`, `python tools/preprocess_data.py` (in a checkout).
"""
from __future__ import annotations

import argparse
import sys

from tinyllm_mcore.data.preprocess import DEFAULT_WORKER_TIMEOUT_S, MODES, Terminated, WorkerError, preprocess
from tinyllm_mcore.runtime.quiet import add_verbose_flag

# Megatron-LM tokenizer flags that would change the ids it writes in ways not reproduced here.
_UNSUPPORTED_TOKENIZER_FLAGS = {
    "vocab_extra_ids": "--vocab-extra-ids (T5 sentinel tokens)",
    "tokenizer_special_tokens": "--tokenizer-special-tokens",
    "tokenizer_sentencepiece_legacy": "--tokenizer-sentencepiece-legacy",
    "tokenizer_hf_include_special_tokens": "--tokenizer-hf-include-special-tokens",
    "trust_remote_code": "--trust-remote-code (no tokenizer code is run here)",
    "tokenizer_metadata": "--tokenizer-metadata",
    "tiktoken_pattern": "--tiktoken-pattern (TikTokenizer)",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = p.add_argument_group("input data")
    group.add_argument("--input", nargs="+", required=True,
                       help="jsonl / jsonl.gz / parquet files, folders or globs of them, or a datasets save_to_disk dir")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract, one output each (pretrain)")
    group.add_argument("--split-sentences", action="store_true",
                       help="one sequence per sentence; outputs are named {prefix}_{key}_sentence")
    group.add_argument("--keep-newlines", action="store_true",
                       help="with --split-sentences: keep the whitespace (newlines) between sentences")
    group.add_argument("--mode", choices=MODES, default="pretrain",
                       help="pretrain: text documents; sft: question/answer or messages; preference: prompt/chosen/"
                            "rejected")
    group.add_argument("--system", default=None, help="chat system text for sft/preference (default: the seed's)")
    group.add_argument("--strict-utf8", action="store_true",
                       help="stop at the first line that is not valid UTF-8 (an error naming its file:line); by "
                            "default such lines are dropped (not written) and counted as invalid_utf8 in the summary")
    group = p.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", default="auto",
                       help="auto (detect), SentencePieceTokenizer / GPTSentencePieceTokenizer / Llama2Tokenizer "
                            "(= auto), HuggingFaceTokenizer (a local folder with tokenizer.json), GPT2BPETokenizer "
                            "(--vocab-file, --merge-file); or sentencepiece, chatglm3, added_tokens")
    group.add_argument("--tokenizer-model", default=None,
                       help="tokenizer.model, a directory holding one, or a Hugging Face tokenizer folder")
    group.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer's vocab.json")
    group.add_argument("--merge-file", default=None, help="GPT2BPETokenizer's merges.txt")
    group.add_argument("--legacy-tokenizer", action="store_true",
                       help="accepted for Megatron-LM command lines; the ids are the same either way")
    group.add_argument("--tokenizer-hf-use-fast", action="store_true",
                       help="accepted for Megatron-LM command lines; the fast tokenizer is always used")
    group.add_argument("--vocab-size", type=int, default=None, help="accepted; no effect for these tokenizer types")
    group.add_argument("--padded-vocab-size", type=int, default=None, help="accepted; no effect on preprocessing")
    # Megatron-LM tokenizer flags whose ids are not reproduced here: parsed so that the error names them.
    hidden = argparse.SUPPRESS
    group.add_argument("--vocab-extra-ids", type=int, default=0, help=hidden)
    group.add_argument("--tokenizer-special-tokens", nargs="+", default=None, help=hidden)
    group.add_argument("--tokenizer-sentencepiece-legacy", action="store_true", help=hidden)
    group.add_argument("--tokenizer-hf-include-special-tokens", action="store_true", help=hidden)
    group.add_argument("--trust-remote-code", action="store_true", help=hidden)
    group.add_argument("--tokenizer-metadata", default=None, help=hidden)
    group.add_argument("--tiktoken-pattern", default=None, help=hidden)
    group = p.add_argument_group("tokenization process")
    group.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")
    group.add_argument("--lang", default="english",
                       help="--split-sentences language: chinese (or zh) = the built-in Chinese splitter; any other "
                            "value is an nltk punkt language (english, german, ...; needs nltk + punkt_tab data)")
    group = p.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_{document|sentence}.bin/.idx")
    group = p.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes (in all)")
    group.add_argument("--partitions", type=int, default=1,
                       help="Megatron-LM's input partitions: documents are dealt round-robin into this many parts, "
                            "which are concatenated (the output order Megatron-LM gives)")
    group.add_argument("--keep-sequential-samples", action="store_true",
                       help="with --partitions: parts are consecutive runs of lines, so the input order is kept")
    group.add_argument("--chunk-size", type=int, default=512, help="records per task sent to a worker")
    group.add_argument("--worker-timeout", type=float, default=DEFAULT_WORKER_TIMEOUT_S, metavar="SECONDS",
                       help="a worker holding one chunk this long without a result is an error (stuck); a worker "
                            "that dies is an error at once (default %(default)g)")
    group.add_argument("--log-interval", type=int, default=1000, help="progress bar update interval (lines)")
    group.add_argument("--no-progress", action="store_true", help="no progress bar (summary only)")
    add_verbose_flag(p)
    return p.parse_args(argv)


def _flag_errors(args) -> str | None:
    for dest, flag in _UNSUPPORTED_TOKENIZER_FLAGS.items():
        value = getattr(args, dest)
        if value not in (None, False, 0):
            return f"{flag} is not supported by this preprocess_data.py (the ids would differ from Megatron-LM's)"
    if args.workers < 1 or args.chunk_size < 1 or args.log_interval < 1:
        return "--workers, --chunk-size and --log-interval must be >= 1"
    if not args.worker_timeout > 0:
        return f"--worker-timeout must be > 0 seconds, got {args.worker_timeout:g}"
    if args.tokenizer_model is None and args.vocab_file is None:
        return "--tokenizer-model is required (or --vocab-file/--merge-file with --tokenizer-type GPT2BPETokenizer)"
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = _flag_errors(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    try:
        result = preprocess(args.input, args.output_prefix, args.tokenizer_model, tokenizer_type=args.tokenizer_type,
                            json_keys=args.json_keys, append_eod=args.append_eod, mode=args.mode,
                            workers=args.workers, chunk_size=args.chunk_size, system=args.system,
                            log_interval=args.log_interval, progress=not args.no_progress,
                            split_sentences=args.split_sentences, keep_newlines=args.keep_newlines, lang=args.lang,
                            partitions=args.partitions, keep_sequential_samples=args.keep_sequential_samples,
                            vocab_file=args.vocab_file, merge_file=args.merge_file, strict_utf8=args.strict_utf8,
                            worker_timeout_s=args.worker_timeout)
    except (FileNotFoundError, NotADirectoryError, ValueError, EOFError, OSError, WorkerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 130
    except Terminated:
        print("error: terminated by SIGTERM: no output written (a dataset already at the prefix is unchanged)",
              file=sys.stderr)
        return 143
    print(result.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
