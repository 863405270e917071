"""cli.train_tokenizer on a tiny corpus: role markers are single pieces, encode/decode round-trips;
`python tools/train_tokenizer.py` as a script."""
import gzip
import json
import random

import pytest

from tests.cli.checkout_scripts import run, the_error_line, tool_command
from tests.harness.text_data import random_text
from tinyllm_mcore.tokenizer.core import ROLE_TOKENS, Tokenizer
from tinyllm_mcore.cli import train_tokenizer as cli


def test_train_tokenizer_cli_from_mixed_inputs(tmp_path):
    rng = random.Random(3)
    texts = [random_text(rng) for _ in range(1500)]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with gzip.open(corpus / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        for t in texts[:500]:
            f.write(json.dumps({"content": t}, ensure_ascii=False) + "\n")
        f.write("not json\n")  # skipped, training only samples
    (corpus / "b.txt").write_text("\n".join(texts[500:1000]), encoding="utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"content": texts[1000:]}), corpus / "c.parquet")

    out = tmp_path / "tok"
    rc = cli.main(["--input", str(corpus), "--output-dir", str(out), "--vocab-size", "900",
                   "--json-key", "content", "--character-coverage", "1.0", "--extra-special-tokens", "<|im_end|>"])
    assert rc == 0
    assert {p.name for p in out.iterdir()} >= {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"}

    tok = Tokenizer.load(out)
    assert tok.vocab_size == 900
    for marker in ROLE_TOKENS:
        marker_id = tok.token_to_id(marker)
        assert tok.sp.is_control(marker_id) and tok.id_to_token(marker_id) == marker
    assert "<|im_end|>" in [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]
    for t in texts[:50] + ["全新的字：龘 and words"]:  # an unseen character goes through byte fallback
        assert tok.detokenize(tok.tokenize(t)) == t
    ids = tok.chat_prompt_ids([{"role": "user", "content": texts[0]}])
    assert sum(i in tok.special_tokens.values() for i in ids) == 3  # system, user, assistant: one id each

    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert {v["content"] for v in config["added_tokens_decoder"].values()} >= set(ROLE_TOKENS)


def test_train_tokenizer_bad_input_is_one_error_line(tmp_path, capsys):
    assert cli.main(["--input", str(tmp_path / "missing.jsonl"), "--output-dir", str(tmp_path / "t")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "missing.jsonl" in err and "\n" not in err


def test_runs_as_a_script(tmp_path):
    """`python tools/train_tokenizer.py` (a checkout script) on a missing input: one error line, no output folder."""
    proc = run(tool_command("train_tokenizer", "--input", "missing.jsonl", "--output-dir", "tok"), cwd=tmp_path)
    assert "missing.jsonl" in the_error_line(proc) and proc.returncode == 1 and not (tmp_path / "tok").exists()


def test_hf_files_load_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tests.harness.text_data import tiny_tokenizer_dir
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir()))
    tok = Tokenizer.load(tiny_tokenizer_dir())
    ids = hf("<|user|>\n你好", add_special_tokens=False)["input_ids"]
    assert ids == [tok.token_to_id("<|user|>")] + tok.tokenize("\n你好")


def test_empty_input_and_bad_vocab_are_one_line_and_leave_no_folder(tmp_path, capsys):
    """Issue 12 item 18: SentencePiece INTERNAL messages, an empty output folder left behind."""
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "keys.jsonl").write_text('{"title": "无正文"}\n[1]\n{"text": ""}\n{"text": 3}\n')
    (tmp_path / "one.jsonl").write_text('{"text": "你好"}\n')
    whole = gzip.compress("\n".join(random_text(random.Random(1)) for _ in range(3000)).encode("utf-8"))
    (tmp_path / "cut.txt.gz").write_bytes(whole[: len(whole) // 2])
    cases = [(["empty.jsonl", "--vocab-size", "300"], "no text to train on in"),
             (["keys.jsonl", "--vocab-size", "300"], "(skipped: 1 empty_text (e.g. "),
             (["one.jsonl", "--vocab-size", "0"], "--vocab-size 0 is too small"),
             (["one.jsonl", "--vocab-size", "-5"], "--vocab-size -5 is too small"),
             (["one.jsonl", "--vocab-size", "100000"], "Vocabulary size too high (100000)"),
             (["cut.txt.gz", "--vocab-size", "300"], "cut.txt.gz: Compressed file ended")]
    for argv, message in cases:
        rc = cli.main(["--input", str(tmp_path / argv[0]), "--output-dir", str(tmp_path / "out" / "tok"), *argv[1:]])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], (argv, err)
        assert "INTERNAL" not in err[0]
        if argv[0] == "keys.jsonl":
            assert all(f"1 {r} (e.g. {tmp_path / 'keys.jsonl'}:" in err[0]
                       for r in ("missing_key", "not_object", "not_string")), err
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), argv


def test_skipped_records_and_invalid_utf8_are_counted(tmp_path, capsys):
    rng = random.Random(5)
    texts = [random_text(rng) for _ in range(300)]
    good = "\n".join(texts[:150]).encode("utf-8")
    (tmp_path / "a.txt").write_bytes(good + b"\n\xff\xfe bad bytes \xc3\n" + "最后一行".encode("utf-8") + b"\n")
    records = [json.dumps({"text": t}, ensure_ascii=False) for t in texts[150:]]
    (tmp_path / "b.jsonl").write_text("\n".join(records + ["not json", '{"title": "x"}', "[1]"]) + "\n",
                                      encoding="utf-8")
    out = tmp_path / "tok"
    assert cli.main(["--input", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), "--output-dir", str(out),
                     "--vocab-size", "600", "--character-coverage", "1.0"]) == 0
    err = capsys.readouterr().err
    assert "skipped 4 record(s) or line(s): 1 bad_json, 1 invalid_utf8, 1 missing_key, 1 not_object" in err, err
    tok = Tokenizer.load(out)
    pieces = {tok.sp.id_to_piece(i) for i in range(tok.vocab_size)}
    assert "\ufffd" not in "".join(pieces)  # the bad line was not trained as replacement characters
