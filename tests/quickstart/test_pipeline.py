"""Quickstart pieces that run in seconds: step failure reporting, run-folder safety, the report from metrics."""
import json
import sys

import pytest

from tinyllm_mcore.quickstart import report
from tinyllm_mcore.quickstart.pipeline import MARKER, Run, Settings, StepFailed, prepare_run_dir, run_step
from tinyllm_mcore.quickstart.qa import pick_chat_questions, score


def test_failing_step_names_step_and_log(tmp_path, capsys):
    prepare_run_dir(tmp_path / "run", overwrite=False)
    run = Run(tmp_path / "run", Settings())
    run_step(run, "ok", [sys.executable, "-c", "print('[pretrain] iter 1/1 | lm loss 1.0')"])
    with pytest.raises(StepFailed) as info:
        run_step(run, "broken", [sys.executable, "-c",
                                 "import sys; print('noise'); print('error: --data-path x: not found'); sys.exit(2)"])
    message = str(info.value)
    assert "'broken'" in message and str(tmp_path / "run" / "logs" / "02_broken.log") in message
    assert "error: --data-path x: not found" in capsys.readouterr().err  # the CLI's own line is surfaced
    assert "noise" in (tmp_path / "run" / "logs" / "02_broken.log").read_text()
    assert [s["name"] for s in json.loads((tmp_path / "run" / "run.json").read_text())["steps"]] == ["ok"]


def test_run_dir_is_only_wiped_when_ours(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        prepare_run_dir(foreign, overwrite=True)
    assert (foreign / "precious.txt").exists()
    ours = tmp_path / "ours"
    prepare_run_dir(ours, overwrite=False)
    (ours / "logs" / "old.log").write_text("x")
    with pytest.raises(FileExistsError):
        prepare_run_dir(ours, overwrite=False)
    prepare_run_dir(ours, overwrite=True)
    assert (ours / MARKER).exists() and not (ours / "logs" / "old.log").exists()


def test_score_per_split():
    records = [{"answer": "甲国的首都是乙城。", "split": "heldout_phrasing"},
               {"answer": "丙国的首都是丁城。", "split": "heldout_phrasing"},
               {"answer": "戊国位于东曜大陆。", "split": "unseen_fact"}]
    scores = score(records, ["甲国的首都是乙城。", "丙国的首都是乙城。", " 戊国位于东曜大陆。 "])
    assert scores["heldout_phrasing"] == {"correct": 1, "total": 2, "accuracy": 0.5}
    assert scores["unseen_fact"]["correct"] == 1 and scores["all"]["correct"] == 2
    chosen = pick_chat_questions([{**r, "entity": str(i), "relation": "capital", "question": str(i)}
                                  for i, r in enumerate(records)], 2)
    assert {r["split"] for r in chosen} == {"heldout_phrasing", "unseen_fact"}


def test_report_from_metrics(tmp_path):
    (tmp_path / "metrics").mkdir()
    for stage, key in (("pretrain", "lm loss"), ("sft", "lm loss"), ("dpo", "dpo loss")):
        with open(tmp_path / "metrics" / f"{stage}.jsonl", "w") as f:
            for it in range(1, 6):
                f.write(json.dumps({"split": "train", "iteration": it, key: 5.0 / it, "tokens_per_s": 1000.0,
                                    **({"reward accuracy": it / 5} if stage == "dpo" else {})}) + "\n")
            f.write(json.dumps({"split": "valid", "iteration": 5, key: 1.5}) + "\n")
    run = Run(tmp_path, Settings.fast())
    run.save()
    scores = lambda acc: {"heldout_phrasing": {"correct": int(acc * 10), "total": 10, "accuracy": acc}}  # noqa: E731
    (tmp_path / "eval.json").write_text(json.dumps({
        "pretrained": {"scores": scores(0.0), "examples": []}, "sft": {"scores": scores(0.9), "examples": []},
        "dpo": {"scores": scores(1.0), "examples": [{"question": "q", "answer": "a", "prediction": "a"}]}}))
    path = report.write_report(tmp_path)
    text = path.read_text()
    for stage in ("pretrain", "sft", "dpo"):
        png = tmp_path / "plots" / f"{stage}_loss.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{stage}_loss.png" in text
    assert "| sft | 90.0% (9/10) |" in text and "| pretrained | 0.0% (0/10) |" in text
    assert "| dpo | 5 | 5.000 | 1.000 | 1.500 |" in text
    assert report.summary_line(tmp_path) == "held-out exact match: pretrained 0.0%, sft 90.0%, dpo 100.0%"
