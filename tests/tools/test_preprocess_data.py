"""tools/preprocess_data.py: indexed files megatron-core reads back exactly, bad lines counted, crash safety."""
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

from tests.tiny_data import tiny_tokenizer, tiny_tokenizer_dir, write_text_jsonl
from tinyllm_mcore.tokenizer import Tokenizer
from tools import preprocess_data as cli

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
    assert "documents: 2" in summary and "skipped lines: 9" in summary
    for reason, count, first_line in [("blank_line", 1, 5), ("bad_json", 3, 2), ("not_object", 1, 4),
                                      ("missing_key", 1, 6), ("not_string", 2, 7), ("empty_text", 1, 9)]:
        assert f"  {reason}: {count} (e.g. {path}:{first_line}" in summary
    tok = tiny_tokenizer()
    assert_documents_equal(tmp_path / "bad_text_document",
                           [tok.tokenize("好的文档一") + [tok.eod], tok.tokenize("好的文档二") + [tok.eod]])


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


def test_failure_midway_leaves_no_index(tmp_path, capsys):
    # A truncated .gz fails after some chunks were written; an old complete output must not survive either.
    write_text_jsonl(tmp_path / "big.jsonl", 3000, seed=9)
    data = gzip.compress((tmp_path / "big.jsonl").read_bytes())
    (tmp_path / "trunc.jsonl.gz").write_bytes(data[: len(data) // 2])
    prefix = tmp_path / "t_text_document"
    Path(str(prefix) + ".bin").write_bytes(b"old")
    Path(str(prefix) + ".idx").write_bytes(b"old")
    rc = cli.main(["--input", str(tmp_path / "trunc.jsonl.gz"), "--output-prefix", str(tmp_path / "t"),
                   "--tokenizer-model", str(tiny_tokenizer_dir()), "--chunk-size", "100", "--no-progress"])
    assert rc == 1
    assert "error:" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl", "trunc.jsonl.gz"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_killed_run_leaves_no_complete_looking_index(tmp_path, sig):
    write_text_jsonl(tmp_path / "c.jsonl", 2000, seed=2)
    with open(tmp_path / "big.jsonl", "wb") as f:  # ~100k lines: several seconds of work
        for _ in range(50):
            f.write((tmp_path / "c.jsonl").read_bytes())
    prefix = tmp_path / "k"
    proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input",
                             str(tmp_path / "big.jsonl"), "--output-prefix", str(prefix), "--tokenizer-model",
                             str(tiny_tokenizer_dir()), "--workers", "2", "--chunk-size", "64", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until tokens are being written
        partial = list(tmp_path.glob("k_text_document.bin.tmp-*"))
        if partial and partial[0].stat().st_size > 20_000:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=30)
    if sig == signal.SIGKILL:
        os.killpg(proc.pid, signal.SIGKILL)  # its orphaned pool workers
    assert not list(tmp_path.glob("*.idx*")), "no index, final or temporary, after an interrupted run"
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err
        assert not list(tmp_path.glob("k_*")), "temporary files are cleaned up on Ctrl-C"
