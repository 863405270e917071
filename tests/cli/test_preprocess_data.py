"""cli.preprocess_data: indexed files megatron-core reads back exactly, bad lines counted, crash safety (signals to
`python tools/preprocess_data.py`, the script users run)."""
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from tests.harness.text_data import tiny_tokenizer, tiny_tokenizer_dir, write_text_jsonl
from tinyllm_mcore.tokenizer.core import Tokenizer
from tinyllm_mcore.cli import preprocess_data as cli

REPO = Path(__file__).resolve().parents[2]


def assert_documents_equal(prefix, expected_docs, dtype=np.uint16):
    dataset = IndexedDataset(str(prefix))
    assert dataset.index.dtype == dtype
    assert len(dataset) == len(expected_docs)
    assert len(dataset.document_indices) == len(expected_docs) + 1
    for i, expected in enumerate(expected_docs):
        assert dataset[i].tolist() == expected, f"document {i}"


def test_round_trip_several_workers_and_chunks(tmp_path, capsys):
    texts = write_text_jsonl(tmp_path / "a.jsonl", 301, seed=5)
    tok = tiny_tokenizer()
    rc = cli.main(["--input", str(tmp_path / "a.jsonl"), "--output-prefix", str(tmp_path / "out" / "corpus"),
                   "--tokenizer-model", str(tiny_tokenizer_dir()), "--append-eod", "--workers", "2",
                   "--chunk-size", "16", "--no-progress"])
    assert rc == 0
    expected = [tok.tokenize(t) + [tok.eod] for t in texts]
    assert_documents_equal(tmp_path / "out" / "corpus_text_document", expected)
    out = capsys.readouterr().out
    assert "documents: 301" in out and f"tokens: {sum(map(len, expected))}" in out and "skipped lines: 0" in out


def test_round_trip_folder_gz_parquet_and_hf_dataset_inputs(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = tiny_tokenizer()
    folder = tmp_path / "corpus"
    folder.mkdir()
    texts_a = write_text_jsonl(folder / "a.jsonl", 40, seed=1)
    texts_b = write_text_jsonl(tmp_path / "b.jsonl", 30, seed=2)
    with gzip.open(folder / "b.jsonl.gz", "wb") as f:
        f.write((tmp_path / "b.jsonl").read_bytes())
    texts_c = write_text_jsonl(tmp_path / "c.jsonl", 20, seed=3)
    pq.write_table(pa.table({"text": texts_c, "title": [t[:3] for t in texts_c]}), folder / "c.parquet")
    texts_d = write_text_jsonl(tmp_path / "d.jsonl", 10, seed=4)
    datasets.Dataset.from_dict({"text": texts_d}).save_to_disk(str(tmp_path / "hf"))

    rc = cli.main(["--input", str(folder), str(tmp_path / "hf"), "--output-prefix", str(tmp_path / "o"),
                   "--tokenizer-model", str(tiny_tokenizer_dir()), "--no-progress", "--chunk-size", "7"])
    assert rc == 0
    # folder files sorted by name: a.jsonl, b.jsonl.gz, c.parquet; then the HF dataset
    assert_documents_equal(tmp_path / "o_text_document", [tok.tokenize(t) for t in texts_a + texts_b + texts_c + texts_d])

    rc = cli.main(["--input", str(folder / "*.parquet"), "--json-keys", "text", "title", "--output-prefix",
                   str(tmp_path / "p"), "--tokenizer-model", str(tiny_tokenizer_dir()), "--no-progress"])
    assert rc == 0
    assert_documents_equal(tmp_path / "p_text_document", [tok.tokenize(t) for t in texts_c])
    assert_documents_equal(tmp_path / "p_title_document", [tok.tokenize(t[:3]) for t in texts_c])


def test_round_trip_with_seed_chatglm3_tokenizer(shared_dir, chatglm3_tokenizer_model, tmp_path):
    lines = []
    with gzip.open(shared_dir / "zh_classics.jsonl.gz", "rt", encoding="utf-8") as f:
        for _ in range(300):
            lines.append(f.readline())
    (tmp_path / "classics.jsonl").write_text("".join(lines), encoding="utf-8")
    rc = cli.main(["--input", str(tmp_path / "classics.jsonl"), "--output-prefix", str(tmp_path / "zh"),
                   "--tokenizer-model", str(chatglm3_tokenizer_model), "--append-eod", "--workers", "2",
                   "--chunk-size", "50", "--no-progress"])
    assert rc == 0
    tok = Tokenizer.load(chatglm3_tokenizer_model)
    expected = [tok.tokenize(json.loads(line)["text"]) + [2] for line in lines]
    assert_documents_equal(tmp_path / "zh_text_document", expected)


# ---------------------------------------------------------------------------------------------------- Megatron-LM
def megatron_lm_files(out_prefix, records, key, tokenizer, *, append_eod, split=None, partitions=1,
                      sequential=False):
    """What Megatron-LM's tools/preprocess_data.py (core_v0.16.1) writes for ``records`` and one json key, built
    with megatron-core's own tokenizer and IndexedDatasetBuilder following the tool's documented procedure: each
    line a document, each sentence (the whole text without splitting) tokenized on its own, empty sentences dropped,
    eod appended to the last sentence; with --partitions, lines dealt round-robin (or in consecutive runs of
    ceil(n / partitions) with --keep-sequential-samples) into parts that are written and then concatenated."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    n = len(records)
    if partitions == 1:
        parts = [range(n)]
    elif sequential:
        size = -(-n // partitions)
        parts = [range(p * size, min(n, (p + 1) * size)) for p in range(partitions)]
    else:
        parts = [range(p, n, partitions) for p in range(partitions)]
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    for p, lines in enumerate(parts):
        builder = IndexedDatasetBuilder(f"{out_prefix}_{p}.bin", dtype=dtype)
        for i in lines:
            text = records[i][key]
            doc, lengths = [], []
            for sentence in (split(text) if split else [text]):
                ids = tokenizer.tokenize(sentence)
                if len(ids) > 0:
                    doc += list(ids)
                    lengths.append(len(ids))
            if doc and append_eod:
                doc.append(tokenizer.eod)
                lengths[-1] += 1
            builder.add_document(doc, lengths)
        builder.finalize(f"{out_prefix}_{p}.idx")
    if partitions == 1:
        os.replace(f"{out_prefix}_0.bin", out_prefix + ".bin")
        os.replace(f"{out_prefix}_0.idx", out_prefix + ".idx")
        return
    merged = IndexedDatasetBuilder(out_prefix + ".bin", dtype=dtype)
    for p in range(partitions):
        merged.add_index(f"{out_prefix}_{p}")
    merged.finalize(out_prefix + ".idx")


def corpus_records(n=157, seed=11):
    """Chinese documents with punctuation, quotes and newlines, plus the edge cases Megatron-LM accepts."""
    import random

    from tests.harness.text_data import random_text

    rng = random.Random(seed)
    texts = [random_text(rng, 5, 120) for _ in range(n)]
    texts[3] = "“你好！”他说。今天天气很好；我们去公园吧？好的……走吧!!版本3.14很好. Hello world. 第二段\n\n标题\n最后"
    texts[5] = ""           # an empty document (no sequences)
    texts[8] = "   "        # whitespace only
    texts[13] = "。！？"     # punctuation only
    return [{"text": t, "title": t[:4]} for t in texts]


def megatron_tokenizer(kind):
    from megatron.core.tokenizers import MegatronTokenizer

    from tests.harness.hf_tokenizer import tiny_hf_tokenizer_dir

    if kind == "sp":
        return MegatronTokenizer.from_pretrained(tokenizer_path=str(tiny_tokenizer_dir() / "tokenizer.model"),
                                                 metadata_path={"library": "sentencepiece"})
    return MegatronTokenizer.from_pretrained(tokenizer_path=str(tiny_hf_tokenizer_dir()),
                                             metadata_path={"library": "huggingface"})


def tokenizer_flags(kind):
    from tests.harness.hf_tokenizer import tiny_hf_tokenizer_dir

    if kind == "sp":
        return ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                str(tiny_tokenizer_dir() / "tokenizer.model")]
    if kind == "hf":
        return ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tiny_hf_tokenizer_dir())]
    return ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(tiny_hf_tokenizer_dir() / "vocab.json"),
            "--merge-file", str(tiny_hf_tokenizer_dir() / "merges.txt")]


MEGATRON_CASES = [  # (tokenizer, flags) -- Megatron-LM command lines, as its users type them
    ("sp", ["--append-eod", "--workers", "2"]),
    ("sp", ["--append-eod", "--workers", "3", "--partitions", "3", "--legacy-tokenizer"]),
    ("sp", ["--workers", "2", "--partitions", "2", "--keep-sequential-samples", "--log-interval", "5"]),
    ("sp", ["--append-eod", "--workers", "2", "--split-sentences", "--lang", "chinese"]),
    ("sp", ["--workers", "2", "--partitions", "2", "--split-sentences", "--lang", "zh", "--keep-newlines"]),
    ("hf", ["--workers", "2", "--json-keys", "text", "title"]),
    ("hf", ["--append-eod", "--workers", "2", "--partitions", "2", "--keep-sequential-samples", "--split-sentences",
            "--lang", "chinese", "--keep-newlines"]),
    ("gpt2", ["--append-eod", "--workers", "1", "--partitions", "3"]),  # same BPE as "hf": same expected ids
]


@pytest.mark.parametrize("kind,flags", MEGATRON_CASES, ids=[" ".join([k] + f) for k, f in MEGATRON_CASES])
def test_files_equal_megatron_lm(tmp_path, kind, flags):
    from tinyllm_mcore.data.sentences import split_chinese
    from tinyllm_mcore.data.vocab_contract import read_sidecar

    records = corpus_records()
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    assert cli.main(["--input", str(path), "--output-prefix", str(tmp_path / "ours"), "--no-progress", "--chunk-size",
                     "16"] + tokenizer_flags(kind) + flags) == 0
    keys = flags[flags.index("--json-keys") + 1:flags.index("--json-keys") + 3] if "--json-keys" in flags else ["text"]
    level = "sentence" if "--split-sentences" in flags else "document"
    keep_newlines = "--keep-newlines" in flags
    partitions = int(flags[flags.index("--partitions") + 1]) if "--partitions" in flags else 1
    tokenizer = megatron_tokenizer("sp" if kind == "sp" else "hf")
    for key in keys:
        expected = tmp_path / f"megatron_{key}_{level}"
        megatron_lm_files(str(expected), records, key, tokenizer, append_eod="--append-eod" in flags,
                          split=(lambda t: split_chinese(t, keep_newlines)) if level == "sentence" else None,
                          partitions=partitions, sequential="--keep-sequential-samples" in flags)
        ours = tmp_path / f"ours_{key}_{level}"
        for suffix in (".bin", ".idx"):
            assert Path(str(ours) + suffix).read_bytes() == Path(str(expected) + suffix).read_bytes(), (key, suffix)
        sidecar = read_sidecar(ours)
        dataset = IndexedDataset(str(ours))
        assert sidecar["tokens"] == int(dataset.sequence_lengths.sum()) and sidecar["documents"] == len(records)
        assert sidecar["max_token_id"] == max(int(dataset[i].max()) for i in range(len(dataset)))
        assert sidecar["level"] == level and sidecar["json_key"] == key and sidecar["mode"] == "pretrain"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ours")) == sorted(
        f"ours_{key}_{level}{s}" for key in keys for s in (".bin", ".idx", ".json"))  # no partition files left


BAD_LINES = [
    '{"text": "好的文档一"}',
    'not json at all',
    '{"text": "unterminated',
    '[1, 2, 3]',
    '',
    '{"other": "no text key"}',
    '{"text": 5}',
    '{"text": null}',
    '{"text": "   "}',
    '{"text": "好的文档二"}',
]


def test_malformed_lines_are_counted_exactly(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(("\n".join(BAD_LINES) + "\n").encode() + b'{"text": "\xff\xfe bad utf8"}\n')
    rc = cli.main(["--input", str(path), "--output-prefix", str(tmp_path / "bad"), "--tokenizer-model",
                   str(tiny_tokenizer_dir()), "--append-eod", "--no-progress", "--workers", "2", "--chunk-size", "3"])
    assert rc == 0
    summary = capsys.readouterr().out
    # Lines Megatron-LM would stop on are skipped and counted; whitespace-only text is a document, as there.
    assert "documents: 3" in summary and "skipped lines: 8" in summary
    for reason, count, first_line in [("blank_line", 1, 5), ("bad_json", 2, 2), ("not_object", 1, 4),
                                      ("missing_key", 1, 6), ("not_string", 2, 7), ("invalid_utf8", 1, 11)]:
        assert f"  {reason}: {count} (e.g. {path}:{first_line}" in summary
    tok = tiny_tokenizer()
    assert_documents_equal(tmp_path / "bad_text_document", [
        tok.tokenize("好的文档一") + [tok.eod], tok.tokenize("   ") + [tok.eod], tok.tokenize("好的文档二") + [tok.eod]])


# Lines where json's C scanner alone (the fast path) and json.loads could disagree: leading whitespace, a byte order
# mark, every JSON whitespace and non-JSON whitespace after the value, data after it, a control character inside a
# string, escapes, no final newline.
EDGE_LINES = [b'  {"text": "lead"}', b'\xef\xbb\xbf{"text": "bom"}', b'{"text": "ws"} \t\r', b'{"text": "x"} {"text": "y"}',
              b'{"text": "x"}, 1', b'{"text": "ff"}\x0c', b'{"text": "ideographic"}\xe3\x80\x80', b'{"text": "x"}]',
              b'{"text": "raw\x01control"}', b'{"text": "\\u4f60\\u597d \\ud83d\\ude00"}', b'{"text": "dup", "text": "2nd"}',
              b'\t', b'{"text": "last line, no newline"}']


def test_lines_are_parsed_exactly_as_json_loads_parses_them(tmp_path, capsys):
    path = tmp_path / "edge.jsonl"
    path.write_bytes(b"\n".join(EDGE_LINES))
    assert cli.main(["--input", str(path), "--output-prefix", str(tmp_path / "edge"), "--tokenizer-model",
                     str(tiny_tokenizer_dir()), "--append-eod", "--no-progress", "--chunk-size", "4"]) == 0
    tok = tiny_tokenizer()
    expected, bad = [], 0
    for line in EDGE_LINES:
        text = line.decode()
        try:
            record = json.loads(text.removeprefix("\ufeff"))
        except ValueError:
            bad += line.strip() != b""
            continue
        expected.append(tok.tokenize(record["text"]) + [tok.eod])
    assert len(expected) == 6 and bad == 6
    assert f"bad_json: {bad} " in capsys.readouterr().out
    assert_documents_equal(tmp_path / "edge_text_document", expected)


def test_a_sentencepiece_run_imports_neither_megatron_nor_torch(tmp_path):
    """Start-up: `python tools/preprocess_data.py` with workers, as users run it, imports neither megatron-core nor
    torch (seconds of imports for a file format and a tokenizer that need neither)."""
    write_text_jsonl(tmp_path / "in.jsonl", 20)
    proc = subprocess.run([sys.executable, "-X", "importtime", str(REPO / "tools" / "preprocess_data.py"), "--input",
                           str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "o"), "--tokenizer-type",
                           "SentencePieceTokenizer", "--tokenizer-model", str(tiny_tokenizer_dir()), "--workers", "2",
                           "--append-eod", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "tinyllm_mcore.data.preprocess" in imported and "sentencepiece" in imported
    assert not {m for m in imported if m.split(".")[0] in ("megatron", "torch")}
    assert (tmp_path / "o_text_document.idx").is_file()


def test_several_json_keys_keep_lines_aligned_per_key(tmp_path, capsys):
    """A line without `title` keeps its `text` document; its `title` output gets an empty document, so document i
    of both outputs comes from line i. A line with neither key is skipped from both."""
    records = [{"text": "正文一", "title": "标题一"}, {"text": "正文二"}, {"title": "只有标题"}, {"id": 4},
               {"text": "正文五", "title": 5}]
    path = tmp_path / "kv.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    assert cli.main(["--input", str(path), "--output-prefix", str(tmp_path / "kv"), "--json-keys", "text", "title",
                     "--tokenizer-model", str(tiny_tokenizer_dir()), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "documents: 4" in out and "skipped lines: 1" in out and "missing_key: 1" in out
    assert f"key 'title' missing_key in 1 written lines (empty document in its output; e.g. {path}:2)" in out
    assert "key 'text' missing_key in 1 written lines" in out and "key 'title' not_string in 1" in out
    tok = tiny_tokenizer()
    for key, expected in (("text", ["正文一", "正文二", None, "正文五"]), ("title", ["标题一", None, "只有标题", None])):
        dataset = IndexedDataset(str(tmp_path / f"kv_{key}_document"))
        assert len(dataset.document_indices) == 5, key
        docs = [[dataset[j].tolist() for j in range(dataset.document_indices[i], dataset.document_indices[i + 1])]
                for i in range(4)]
        assert docs == [[tok.tokenize(t)] if t else [] for t in expected], key


@pytest.mark.parametrize("content,why", [("", "no records to read"),
                                         ('{"other": 1}\n{"other": 2}\n', "missing_key 2")])
def test_zero_documents_is_an_error_and_writes_nothing(tmp_path, capsys, content, why):
    path = tmp_path / "in.jsonl"
    path.write_text(content)
    assert cli.main(["--input", str(path), "--output-prefix", str(tmp_path / "z"), "--tokenizer-model",
                     str(tiny_tokenizer_dir()), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.count("\n") == 0 and why in err and "in.jsonl" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_one_key_missing_everywhere_fails_the_whole_run(tmp_path, capsys):
    write_text_jsonl(tmp_path / "t.jsonl", 20)
    assert cli.main(["--input", str(tmp_path / "t.jsonl"), "--output-prefix", str(tmp_path / "o"), "--json-keys",
                     "text", "title", "--tokenizer-model", str(tiny_tokenizer_dir()), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert "--json-keys title" in err and "missing_key 20" in err and err.count("\n") == 0
    assert not list(tmp_path.glob("o_*"))


@pytest.mark.parametrize("flags,message", [
    (["--split-sentences", "--mode", "sft"], "--split-sentences applies to pretraining documents"),
    (["--tokenizer-hf-include-special-tokens"], "--tokenizer-hf-include-special-tokens is not supported"),
    (["--vocab-extra-ids", "100"], "--vocab-extra-ids"),
    (["--tokenizer-type", "TikTokenizer"], "--tokenizer-type TikTokenizer is not supported here"),
    (["--partitions", "0"], "--partitions must be >= 1"),
    (["--json-keys", "text", "text"], "--json-keys has a key twice"),
])
def test_flags_that_cannot_mean_the_same_are_one_error_line(tmp_path, capsys, flags, message):
    write_text_jsonl(tmp_path / "t.jsonl", 3)
    assert cli.main(["--input", str(tmp_path / "t.jsonl"), "--output-prefix", str(tmp_path / "o"),
                     "--tokenizer-model", str(tiny_tokenizer_dir()), "--no-progress"] + flags) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.count("\n") == 0 and message in err, err
    assert not list(tmp_path.glob("o_*"))


def test_english_sentences_need_nltk_punkt_data(tmp_path, capsys):
    write_text_jsonl(tmp_path / "t.jsonl", 3)
    rc = cli.main(["--input", str(tmp_path / "t.jsonl"), "--output-prefix", str(tmp_path / "o"), "--tokenizer-model",
                   str(tiny_tokenizer_dir()), "--no-progress", "--split-sentences"])  # --lang english by default
    try:
        from nltk.tokenize.punkt import PunktTokenizer
        PunktTokenizer("english")
    except (ImportError, LookupError, OSError):
        assert rc == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "--lang chinese" in err and "punkt" in err
        return
    assert rc == 0 and (tmp_path / "o_text_sentence.idx").is_file()


def test_sft_with_an_hf_tokenizer_lacking_role_markers_says_how_to_add_them(tmp_path, capsys):
    from tests.harness.hf_tokenizer import tiny_hf_tokenizer_dir

    (tmp_path / "sft.jsonl").write_text(json.dumps({"question": "一", "answer": "二"}, ensure_ascii=False) + "\n")
    assert cli.main(["--mode", "sft", "--input", str(tmp_path / "sft.jsonl"), "--output-prefix", str(tmp_path / "s"),
                     "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                     str(tiny_hf_tokenizer_dir(with_roles=False)), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "<|user|>" in err and "add_special_tokens" in err and "save_pretrained" in err

    assert cli.main(["--mode", "sft", "--input", str(tmp_path / "sft.jsonl"), "--output-prefix", str(tmp_path / "s"),
                     "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tiny_hf_tokenizer_dir()),
                     "--no-progress"]) == 0
    tok = Tokenizer.load(tiny_hf_tokenizer_dir())
    dataset = IndexedDataset(str(tmp_path / "s_sft_document"))
    assert [dataset[i].tolist() for i in range(2)] == tok.encode_conversation(
        [{"role": "user", "content": "一"}, {"role": "assistant", "content": "二"}])
    assert tok.token_to_id("<|user|>") in dataset[0].tolist()


def test_sft_and_preference_modes_count_bad_records(tmp_path, capsys):
    sft = tmp_path / "sft.jsonl"
    sft.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"question": "一", "answer": "二"},
        {"question": "一"},                                   # missing answer
        {"messages": [{"role": "user", "content": "三"}]},   # nothing to learn
        {"messages": "oops"},                                 # bad messages
        {"messages": [{"role": "user", "content": "四"}, {"role": "assistant", "content": "五"}], "system": "系统"},
    ]) + "\n", encoding="utf-8")
    assert cli.main(["--mode", "sft", "--input", str(sft), "--output-prefix", str(tmp_path / "s"),
                     "--tokenizer-model", str(tiny_tokenizer_dir()), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "documents: 2" in out and "missing_key: 1" in out and "no_answer: 1" in out and "bad_messages: 1" in out
    dataset = IndexedDataset(str(tmp_path / "s_sft_document"))
    tok = tiny_tokenizer()
    expected = tok.encode_conversation([{"role": "user", "content": "四"}, {"role": "assistant", "content": "五"}],
                                       system="系统")
    assert list(dataset.document_indices) == [0, 2, 4]
    assert [dataset[i].tolist() for i in (2, 3)] == expected

    pref = tmp_path / "pref.jsonl"
    pref.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"prompt": "问", "chosen": "好", "rejected": "坏"},
        {"prompt": "问", "chosen": "好"},                      # missing rejected
        {"prompt": "问", "chosen": "好", "rejected": ""},      # empty
    ]) + "\n", encoding="utf-8")
    assert cli.main(["--mode", "preference", "--input", str(pref), "--output-prefix", str(tmp_path / "p"),
                     "--tokenizer-model", str(tiny_tokenizer_dir()), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "documents: 1" in out and "missing_key: 1" in out and "empty_text: 1" in out
    dataset = IndexedDataset(str(tmp_path / "p_preference_document"))
    assert [dataset[i].tolist() for i in range(3)] == [
        tok.chat_prompt_ids([{"role": "user", "content": "问"}]), tok.tokenize("好") + [tok.eos],
        tok.tokenize("坏") + [tok.eos]]
    from tinyllm_mcore.data.vocab_contract import read_sidecar
    assert read_sidecar(tmp_path / "p_preference_document")["mode"] == "preference"


def test_bad_paths_exit_nonzero_with_one_line(tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    assert cli.main(["--input", str(missing), "--output-prefix", str(tmp_path / "x"),
                     "--tokenizer-model", str(tiny_tokenizer_dir())]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing.jsonl" in err
    write_text_jsonl(tmp_path / "ok.jsonl", 3)
    assert cli.main(["--input", str(tmp_path / "ok.jsonl"), "--output-prefix", str(tmp_path / "x"),
                     "--tokenizer-model", str(tmp_path / "no_tokenizer.model")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no_tokenizer.model" in err
    assert not list(tmp_path.glob("x_*"))


# ---------------------------------------------------------------------------------------------------- faults
def previous_dataset(tmp_path, name="t"):
    """A good dataset already at the prefix; returns {file: bytes} to compare after a failed re-run."""
    write_text_jsonl(tmp_path / "small.jsonl", 5, seed=1)
    assert cli.main(["--input", str(tmp_path / "small.jsonl"), "--output-prefix", str(tmp_path / name),
                     "--tokenizer-model", str(tiny_tokenizer_dir()), "--no-progress"]) == 0
    return {p.name: p.read_bytes() for p in tmp_path.glob(f"{name}_text_document.*")}


def test_failure_midway_keeps_the_previous_dataset(tmp_path, capsys):
    before = previous_dataset(tmp_path)
    assert sorted(before) == ["t_text_document.bin", "t_text_document.idx", "t_text_document.json"]
    write_text_jsonl(tmp_path / "big.jsonl", 3000, seed=9)
    data = gzip.compress((tmp_path / "big.jsonl").read_bytes())
    (tmp_path / "trunc.jsonl.gz").write_bytes(data[: len(data) // 2])
    rc = cli.main(["--input", str(tmp_path / "trunc.jsonl.gz"), "--output-prefix", str(tmp_path / "t"),
                   "--tokenizer-model", str(tiny_tokenizer_dir()), "--chunk-size", "100", "--no-progress",
                   "--workers", "2"])
    assert rc == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: reading ") and "trunc.jsonl.gz" in err and err.count("\n") == 0
    assert {p.name: p.read_bytes() for p in tmp_path.glob("t_*")} == before
    assert not list(tmp_path.glob("*.tmp-*"))


def big_input(tmp_path):
    write_text_jsonl(tmp_path / "c.jsonl", 2000, seed=2)
    with open(tmp_path / "big.jsonl", "wb") as f:  # ~100k lines: several seconds of work
        for _ in range(50):
            f.write((tmp_path / "c.jsonl").read_bytes())
    return tmp_path / "big.jsonl"


def start_and_wait_for_output(tmp_path, prefix, extra=()):
    proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input",
                             str(big_input(tmp_path)), "--output-prefix", str(prefix), "--tokenizer-model",
                             str(tiny_tokenizer_dir()), "--workers", "2", "--chunk-size", "64", "--no-progress",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 90
    while time.time() < deadline:  # wait until tokens are being written
        partial = [p for p in tmp_path.glob(f"{Path(prefix).name}_text_document*.tmp-*") if p.suffix != ".idx"]
        if partial and max(p.stat().st_size for p in partial) > 20_000:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("sig,group", [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGTERM, True)])
def test_interrupted_run_keeps_the_previous_dataset_and_leaves_nothing(tmp_path, sig, group):
    """Ctrl-C, or SIGTERM to the main process or to the whole process group (Slurm, timeout): exit 130/143, the
    previous dataset as it was, no temporary files, no worker tracebacks."""
    before = previous_dataset(tmp_path, "k")
    proc = start_and_wait_for_output(tmp_path, tmp_path / "k", ["--partitions", "2"] if group else [])
    os.killpg(proc.pid, sig) if group else os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    err = err.decode()
    assert proc.returncode == (130 if sig == signal.SIGINT else 143), err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert {p.name: p.read_bytes() for p in tmp_path.glob("k_*")} == before
    assert not list(tmp_path.glob("*.tmp-*"))


def test_killed_run_leaves_no_index_and_the_next_run_removes_its_temporaries(tmp_path):
    proc = start_and_wait_for_output(tmp_path, tmp_path / "k")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert not list(tmp_path.glob("k_*.idx")), "no final index after a killed run"
    assert list(tmp_path.glob("k_*.tmp-*"))  # what SIGKILL cannot clean up...
    write_text_jsonl(tmp_path / "small.jsonl", 5, seed=1)
    assert cli.main(["--input", str(tmp_path / "small.jsonl"), "--output-prefix", str(tmp_path / "k"),
                     "--tokenizer-model", str(tiny_tokenizer_dir()), "--no-progress"]) == 0
    assert not list(tmp_path.glob("*.tmp-*"))  # ...the next run at that prefix removes (its process is gone)


def test_disk_full_is_one_line_and_keeps_the_previous_dataset(tmp_path, capsys):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        write_text_jsonl(tmp_path / "small.jsonl", 5, seed=1)
        assert cli.main(["--input", str(tmp_path / "small.jsonl"), "--output-prefix", str(disk / "d"),
                         "--tokenizer-model", str(tiny_tokenizer_dir()), "--no-progress"]) == 0
        before = {p.name: p.read_bytes() for p in disk.iterdir()}
        capsys.readouterr()
        write_text_jsonl(tmp_path / "c.jsonl", 2000, seed=2)
        with open(tmp_path / "big.jsonl", "wb") as f:  # ~2 MB of tokens: does not fit in 1 MB
            for _ in range(10):
                f.write((tmp_path / "c.jsonl").read_bytes())
        rc = cli.main(["--input", str(tmp_path / "big.jsonl"), "--output-prefix", str(disk / "d"),
                       "--tokenizer-model", str(tiny_tokenizer_dir()), "--no-progress", "--workers", "2"])
        err = capsys.readouterr().err.strip()
        assert rc == 1 and err.count("\n") == 0 and "No space left on device" in err and str(disk / "d") in err
        assert {p.name: p.read_bytes() for p in disk.iterdir()} == before
    finally:
        subprocess.run(["umount", str(disk)], check=True)
