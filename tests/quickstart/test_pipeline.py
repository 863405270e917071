"""Quickstart pieces that run in seconds: step failure reporting, run-folder safety, the report from metrics."""
import json
import sys

import pytest

from tinyllm_mcore.quickstart import report
from tinyllm_mcore.quickstart.pipeline import MARKER, Run, Settings, StepFailed, prepare_run_dir, run_step
from tinyllm_mcore.quickstart.qa import pick_chat_questions, score, summarize_pairs


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


def test_score_per_split_is_style_aware():
    records = [{"answer": "甲国的首都是乙城。", "entity": "甲国", "relation": "capital", "split": "heldout_phrasing"},
               {"answer": "丙国的首都是丁城。", "entity": "丙国", "relation": "capital", "split": "heldout_phrasing"},
               {"answer": "戊国位于东曜大陆。", "entity": "戊国", "relation": "continent", "split": "unseen_fact"}]
    scores = score(records, ["甲国的首都是乙城。", "丁城。", " 戊国位于西岭大陆。 "])
    assert scores["heldout_phrasing"] == {"correct": 2, "total": 2, "accuracy": 1.0, "preferred_style": 1,
                                          "preferred_style_rate": 0.5}
    assert scores["unseen_fact"]["correct"] == 0 and scores["unseen_fact"]["preferred_style"] == 1
    assert scores["all"]["correct"] == 2 and scores["all"]["preferred_style"] == 2
    chosen = pick_chat_questions([{**r, "entity": str(i), "question": str(i)} for i, r in enumerate(records)], 2)
    assert {r["split"] for r in chosen} == {"heldout_phrasing", "unseen_fact"}


def test_pair_summary_accuracy_and_margin_per_kind_and_split():
    pairs = [{"kind": "style", "split": "a"}, {"kind": "style", "split": "b"}, {"kind": "fact", "split": "a"}]
    summary = summarize_pairs(pairs, [1.0, -0.5, 2.0])
    assert summary["style"]["a"] == {"pairs": 1, "accuracy": 1.0, "mean_margin": 1.0}
    assert summary["style"]["all"] == {"pairs": 2, "accuracy": 0.5, "mean_margin": 0.25}
    assert summary["all"]["all"]["pairs"] == 3 and summary["all"]["all"]["accuracy"] == 2 / 3
    assert summary["fact"]["all"]["mean_margin"] == 2.0


def test_report_from_metrics(tmp_path):
    (tmp_path / "metrics").mkdir()
    for stage, key in (("pretrain", "lm loss"), ("sft", "lm loss"), ("dpo", "dpo loss"), ("reward", "reward loss")):
        with open(tmp_path / "metrics" / f"{stage}.jsonl", "w") as f:
            for it in range(1, 6):
                f.write(json.dumps({"split": "train", "iteration": it, key: 5.0 / it, "tokens_per_s": 1000.0,
                                    **({"rewards/accuracy": it / 5} if stage == "dpo" else {})}) + "\n")
            f.write(json.dumps({"split": "valid", "iteration": 5, key: 1.5}) + "\n")
    run = Run(tmp_path, Settings.fast())
    run.save()

    def scores(fact, style):
        return {"heldout_phrasing": {"correct": int(fact * 10), "total": 10, "accuracy": fact,
                                     "preferred_style": int(style * 10), "preferred_style_rate": style}}

    def pairs(style, fact):
        return {kind: {split: {"pairs": 4, "accuracy": acc, "mean_margin": acc - 0.5}
                       for split in ("heldout_phrasing", "all")}
                for kind, acc in (("style", style), ("fact", fact), ("all", (style + fact) / 2))}

    (tmp_path / "eval.json").write_text(json.dumps({
        "models": {"pretrained": {"scores": scores(0.0, 0.0), "examples": []},
                   "sft": {"scores": scores(0.9, 0.5), "examples": []},
                   "dpo": {"scores": scores(1.0, 0.9),
                           "examples": [{"question": "q", "answer": "a", "prediction": "a"}]}},
        "dpo_heldout_pairs": {"policy": "dpo", "reference": "sft", "beta": 0.1, "summary": pairs(1.0, 0.75)},
        "reward_model": {"checkpoint": "x", "heldout_pairs": pairs(1.0, 0.5),
                         "dpo_vs_sft": {"questions": 10, "same_answer": 2, "policy_preferred": 6,
                                        "reference_preferred": 2, "policy_win_rate": 0.75}}}))
    path = report.write_report(tmp_path)
    text = path.read_text()
    for stage in ("pretrain", "sft", "dpo", "reward"):
        png = tmp_path / "plots" / f"{stage}_loss.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{stage}_loss.png" in text
    assert "| sft | 90.0% (9/10) | 50.0% | (reference) |" in text
    assert "| dpo | 100.0% (10/10) | 90.0% | 100.0% / 75.0% |" in text
    assert "| pretrained | 0.0% (0/10) | 0.0% | - |" in text
    assert "| dpo | 5 | 5.000 | 1.000 | 1.500 |" in text
    assert "DPO preferred in 75.0% of the questions where they differ" in text
    assert report.summary_line(tmp_path) == (
        "held-out phrasings: facts pretrained 0.0%, sft 90.0%, dpo 100.0%; full-sentence style pretrained 0.0%, "
        "sft 50.0%, dpo 90.0%; DPO pair accuracy 87.5%; reward model pair accuracy 75.0%; reward model prefers DPO's "
        "answer 75.0%")


# Natural Chinese prose (written for this test), a stand-in for a user's real-text corpus.
REAL_TEXT = (
    "清晨的雾气慢慢散去，街角的早餐店已经排起了长队。",
    "老师提醒同学们，考试之前一定要把错题再看一遍。",
    "这座城市的地铁四通八达，上下班高峰时依然十分拥挤。",
    "秋天到了，山上的枫叶一片火红，吸引了许多摄影爱好者。",
    "奶奶把晒干的辣椒装进布袋，准备过年时做一锅香喷喷的腊肉。",
    "图书馆新到了一批科普读物，孩子们一放学就跑去借阅。",
    "他每天坚持跑步五公里，半年下来体重减轻了不少。",
    "雨下了整整一夜，河水涨了起来，渔民们暂时停止了出海。",
)


def write_real_corpus(folder):
    """The same prose in formats tools/preprocess_data.py reads: jsonl.gz and parquet files in one folder."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    with gzip.open(folder / "part1.jsonl.gz", "wt", encoding="utf-8") as f:
        for text in REAL_TEXT[:5]:
            f.write(json.dumps({"text": text, "source": "test"}, ensure_ascii=False) + "\n")
    pq.write_table(pa.table({"text": list(REAL_TEXT[5:])}), folder / "part2.parquet")
    return folder


def test_corpus_is_streamed_mixed_with_the_facts_tokenized_and_reported(tmp_path, capsys):
    """`--corpus` end to end up to the indexed dataset: gzip and parquet through the project's corpus reader, mixed
    with the synthetic fact documents, covered by the tokenizer, tokenized by preprocess_data (the real CLIs)."""
    from tinyllm_mcore.quickstart.pipeline import preprocess, train_tokenizer, write_corpus
    from tinyllm_mcore.tokenizer.core import Tokenizer

    corpus = write_real_corpus(tmp_path / "corpus")
    prepare_run_dir(tmp_path / "run", overwrite=False)
    run = Run(tmp_path / "run", Settings(), str(corpus))
    paths = write_corpus(run, str(corpus))  # the steps run_pipeline starts with (prepare_data), SFT/DPO data aside
    train_tokenizer(run, paths)
    preprocess(run, paths, "pretrain")

    out = capsys.readouterr().out
    assert f"user text from {corpus} + synthetic fact documents" in out
    assert "8 documents" in out and "2 source file(s)" in out and "synthetic\n" not in out
    used = json.loads((tmp_path / "run" / "run.json").read_text())["corpus_used"]
    assert used["documents"] == 8 and used["characters"] == sum(map(len, REAL_TEXT)) and not used["truncated"]
    pretrain = [json.loads(l)["text"] for l in paths["pretrain"].read_text(encoding="utf-8").splitlines()]
    assert sorted(t for t in pretrain if t in REAL_TEXT) == sorted(REAL_TEXT)
    assert len(pretrain) == 8 + 1200  # every synthetic fact document is still there
    assert any(t in REAL_TEXT for t in pretrain[:200])  # shuffled together, not appended

    tokenizer = Tokenizer.load(str(tmp_path / "run" / "tokenizer"))
    for text in REAL_TEXT:  # every character has a piece (no unknowns, no byte fallback)
        ids = tokenizer.tokenize(text)
        assert tokenizer.detokenize(ids) == text and len(ids) <= len(text) + 1  # + the word-start piece
    log = (tmp_path / "run" / "logs" / "03_preprocess_pretrain.log").read_text()
    assert "documents: 1208" in log

    report_text = report.write_report(tmp_path / "run").read_text()
    assert f"`{corpus}` (8 documents" in report_text and "mixed with the synthetic fact documents" in report_text


def test_corpus_budget_and_bad_corpus_inputs(tmp_path, capsys):
    import gzip

    from tinyllm_mcore.quickstart.__main__ import main
    from tinyllm_mcore.quickstart.pipeline import read_user_corpus

    corpus = write_real_corpus(tmp_path / "corpus")
    docs, used = read_user_corpus(str(corpus / "*.jsonl.gz"), budget_chars=30)  # a glob, stopped at the budget
    assert used["truncated"] and used["characters"] == 30
    assert "".join(d["text"] for d in docs) == "".join(REAL_TEXT)[:30]

    (tmp_path / "damaged.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 100)[:40])
    (tmp_path / "empty.jsonl").write_text('{"title": "no text field"}\n')
    for bad, message in ((tmp_path / "missing.jsonl.gz", "no such file or directory"),
                         (tmp_path / "damaged.jsonl.gz", "cannot read it"),
                         (tmp_path / "empty.jsonl", "no document with a non-empty \"text\" field")):
        assert main(["--output-dir", str(tmp_path / f"run_{bad.stem}"), "--corpus", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --corpus {bad}") and message in err and len(err.splitlines()) == 1, err
