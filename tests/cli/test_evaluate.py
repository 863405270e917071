"""cli.evaluate in-process: multiple choice and perplexity on an HF directory, result files, bad input;
`python tools/evaluate.py` as a script."""
import json

import pytest

from tests.cli.checkout_scripts import run, the_error_line, tool_command
from tests.harness.cmmlu import make_tiny_hf_model, random_questions, write_cmmlu_csv, write_cmmlu_dir
from tinyllm_mcore.cli import evaluate


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("tool") / "hf")


def test_multiple_choice_writes_json_and_markdown(tmp_path, hf_dir, capsys):
    bench = write_cmmlu_dir(tmp_path / "cmmlu", {"agronomy": 6, "chinese_history": 5}, dev=2)
    write_cmmlu_csv(bench / "test" / "agronomy.csv", random_questions(6, 0),
                    extra_rows=[["6", "坏行", "甲", "乙", "丙", "丁", "X"]])
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    rc = evaluate.main(["--hf", str(hf_dir), "--benchmark-dir", str(bench), "--shots", "2",
                        "--output-json", str(out_json), "--output-md", str(out_md)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    result = json.loads(out_json.read_text())
    assert result["questions"] == 11 and result["skipped_rows"] == 1
    assert set(result["categories"]) == {"Other", "Humanities", "China specific"}
    assert result["subjects"]["chinese_history"]["shots"] == 2
    assert "| chinese_history | 中国历史 |" in out_md.read_text()
    assert "skipped 1 malformed row(s) (1 answer not in A-D; lines 8)" in captured.err
    assert "questions/s" in captured.out


def test_gen_mode_runs(tmp_path, hf_dir):
    bench = write_cmmlu_dir(tmp_path / "cmmlu", {"arts": 3}, dev=1)
    out_json = tmp_path / "g.json"
    assert evaluate.main(["--hf", str(hf_dir), "--benchmark-dir", str(bench), "--mode", "gen", "--max-new-tokens", "3",
                          "--output-json", str(out_json)]) == 0
    result = json.loads(out_json.read_text())
    assert result["mode"] == "gen" and len(result["records"]["arts"]) == 3
    assert all("response" in r for r in result["records"]["arts"])


def test_perplexity_on_jsonl(tmp_path, hf_dir, capsys):
    data = tmp_path / "held_out.jsonl"
    data.write_text('{"text": "今天天气很好，我们去公园。"}\nnot json\n{"text": "中国的首都是北京。"}\n', encoding="utf-8")
    assert evaluate.main(["--hf", str(hf_dir), "--jsonl", str(data), "--seq-length", "16"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["skipped_lines"] == 1 and result["tokens"] > 10 and result["perplexity"] > 1


@pytest.mark.parametrize("argv,message", [
    (["--benchmark-dir", "x"], "exactly one of --load"),
    (["--hf", "HF", "--load", "ck", "--benchmark-dir", "x"], "exactly one of --load"),
    (["--hf", "HF"], "give --benchmark-dir"),
    (["--hf", "HF", "--benchmark-dir", "/does/not/exist"], "benchmark directory not found"),
    (["--hf", "/does/not/exist", "--jsonl", "/does/not/exist.jsonl"], "not a Hugging Face model directory"),
    (["--load", "/does/not/exist", "--tokenizer-model", "TOK", "--benchmark-dir", "BENCH"],
     "checkpoint path does not exist"),
])
def test_bad_input_is_one_line(argv, message, hf_dir, tmp_path, capsys):
    bench = write_cmmlu_dir(tmp_path / "cmmlu", {"arts": 2}, dev=1)
    from tests.harness.text_data import tiny_tokenizer_dir

    argv = [a.replace("HF", str(hf_dir)).replace("BENCH", str(bench)).replace("TOK", str(tiny_tokenizer_dir()))
            for a in argv]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_shots_without_dev_split(tmp_path, hf_dir, capsys):
    write_cmmlu_csv(tmp_path / "c" / "test" / "arts.csv", random_questions(2, 0))
    assert evaluate.main(["--hf", str(hf_dir), "--benchmark-dir", str(tmp_path / "c"), "--shots", "1"]) == 2
    assert "needs the dev split" in capsys.readouterr().err


def test_runs_as_a_script(tmp_path, hf_dir):
    """`python tools/evaluate.py` (a checkout script) on bad input: one error line naming the folder."""
    proc = run(tool_command("evaluate", "--hf", hf_dir, "--benchmark-dir", tmp_path / "missing"), cwd=tmp_path)
    assert "benchmark directory not found" in the_error_line(proc) and str(tmp_path / "missing") in proc.stderr


def test_more_shots_than_dev_questions_and_zero_new_tokens_are_refused(tmp_path, hf_dir, capsys):
    """Issue 12 item 8: --shots 99 with 3 dev rows ran 3-shot silently; --mode gen --max-new-tokens 0 was accepted."""
    bench = write_cmmlu_dir(tmp_path / "cmmlu", {"arts": 2}, dev=3)
    assert evaluate.main(["--hf", str(hf_dir), "--benchmark-dir", str(bench), "--shots", "99"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --shots 99: ") and "arts.csv has only 3" in err[0], err
    assert evaluate.main(["--hf", str(hf_dir), "--benchmark-dir", str(bench), "--shots", "3", "--output-json",
                          str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["subjects"]["arts"]["shots"] == 3
    capsys.readouterr()
    assert evaluate.main(["--hf", str(hf_dir), "--benchmark-dir", str(bench), "--mode", "gen",
                          "--max-new-tokens", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == "error: --max-new-tokens must be >= 1, got 0", err


def test_non_utf8_csv_names_the_file(tmp_path, hf_dir, capsys):
    """Issue 12 item 8: a GBK-encoded CSV gave a codec error without the file name."""
    bench = write_cmmlu_dir(tmp_path / "cmmlu", {"arts": 2}, dev=1)
    path = bench / "test" / "arts.csv"
    path.write_bytes(path.read_text(encoding="utf-8").encode("gbk"))
    assert evaluate.main(["--hf", str(hf_dir), "--benchmark-dir", str(bench)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}: not UTF-8 text"), err
