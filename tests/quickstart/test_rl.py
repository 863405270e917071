"""The RL quickstart (`python -m tinyllm_mcore.quickstart.rl`): SFT on an unreliable teacher, then GRPO at DP2,
run end to end the way a user runs it (~3.5 min on 2 cores); its held-out numbers are recomputed here from the HF
exports with transformers, not read from its report. Plus the task split, the teacher and bad input.

Measured on 2 cores (seed 1234): SFT 30.5% -> GRPO 98.0% held-out accuracy; the bounds leave room for other CPUs.
"""
import json
import subprocess
import sys

import pytest

from tinyllm_mcore.quickstart import rl, rl_eval, rl_task


def test_problems_split_once_and_the_teacher_is_careless_as_documented(tmp_path):
    train, heldout = rl_task.split_problems(seed=1234)
    assert len(heldout) == rl_task.EVAL_SIZE and len(train) + len(heldout) == 9 ** 3
    assert not {p.question for p in train} & {p.question for p in heldout}
    assert rl_task.split_problems(seed=1234) == (train, heldout) and rl_task.split_problems(seed=1)[1] != heldout

    files = rl_task.write_task_files(tmp_path / "data", tmp_path / "rl", seed=1234, teacher_samples=4)
    sft = [json.loads(line) for line in files["sft"].read_text(encoding="utf-8").splitlines()]
    prompts = [json.loads(line) for line in files["prompts"].read_text(encoding="utf-8").splitlines()]
    evaluation = rl_eval.read_eval(files["eval"])
    held = {r["question"] for r in evaluation}
    assert len(evaluation) == rl_task.EVAL_SIZE and all(isinstance(r["answer"], int) for r in evaluation)
    assert not held & {r["question"] for r in sft} and not held & {r["prompt"] for r in prompts}
    assert len(sft) == 4 * len(train) and all(r["system"] == "" for r in sft)

    careless = {"above 3": [], "1-3": []}
    for record in sft:
        a, b, c = (int(x) for x in record["question"].split()[1].split("+"))
        lines = record["answer"].split("\n")
        assert lines[:2] == [f"{a}+{b}={a + b}", f"{a + b}+{c}={a + b + c}"]  # the worked lines are always right
        final = int(lines[2].removeprefix("<answer>").removesuffix("</answer>"))
        assert final in (a + b, a + b + c)
        careless["above 3" if c > 3 else "1-3"].append(final == a + b)
    for kind, flags in careless.items():
        assert abs(sum(flags) / len(flags) - rl_task.CARELESS[kind]) < 0.05, kind


def test_bad_input_is_one_error_line(tmp_path, capsys):
    bad = tmp_path / "eval.jsonl"
    bad.write_text('{"question": "计算 1+2+3"}\n', encoding="utf-8")
    assert rl_eval.main(["--eval-data", str(bad), "--model", f"x={tmp_path}", "--output-json",
                         str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and f"{bad}:1" in err[0]

    bad.write_text('{"question": "计算 1+2+3", "answer": 6}\n', encoding="utf-8")
    assert rl_eval.main(["--eval-data", str(bad), "--model", f"x={tmp_path}", "--output-json",
                         str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NAME=HF_DIR" in err[0]

    assert rl.main(["--output-dir", str(tmp_path / "run"), "--prompts-per-step", "3", "--group-size", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--data-parallel" in err[0]

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not a quickstart run")
    assert rl.main(["--output-dir", str(foreign)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not made by the quickstart" in err[0]
    assert (foreign / "keep.txt").is_file()


@pytest.mark.slow
def test_grpo_raises_heldout_accuracy_of_the_hf_export_by_20_points(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "tinyllm_mcore.quickstart.rl", "--output-dir", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    records = rl_eval.read_eval(out / "rl" / "eval.jsonl")
    assert len(records) == rl_task.EVAL_SIZE
    for name in ("hf_sft", "hf_grpo"):
        config = json.loads((out / "rl" / name / "tokenizer_config.json").read_text(encoding="utf-8"))
        assert config.get("chat_template"), name
    # the held-out score, recomputed from the exports with transformers' greedy decoding
    sft = rl_eval.score(str(out / "rl" / "hf_sft"), records, max_new_tokens=40)
    grpo = rl_eval.score(str(out / "rl" / "hf_grpo"), records, max_new_tokens=40)
    assert 0 < sft["accuracy"] < 0.5, sft["accuracy"]
    assert grpo["accuracy"] - sft["accuracy"] >= 0.20, (sft["accuracy"], grpo["accuracy"])
    reported = json.loads((out / "rl" / "eval.json").read_text(encoding="utf-8"))
    assert reported["sft"]["correct"] == sft["correct"] and reported["grpo"]["correct"] == grpo["correct"]

    report = (out / "report.md").read_text(encoding="utf-8")
    assert f"{sft['accuracy']:.1%} ({sft['correct']}/200)" in report
    assert f"{grpo['accuracy']:.1%} ({grpo['correct']}/200)" in report
    assert "rl/reward_curve.png" in report and (out / "rl" / "reward_curve.png").stat().st_size > 5000
    assert f"SFT {sft['accuracy']:.1%} -> GRPO {grpo['accuracy']:.1%}" in proc.stdout

    metrics = [json.loads(line) for line in (out / "metrics" / "grpo.jsonl").read_text(encoding="utf-8").splitlines()]
    train = [m for m in metrics if m["split"] == "train"]
    assert train[-1]["reward mean"] > train[0]["reward mean"] + 0.2
    steps = [s["name"] for s in json.loads((out / "run.json").read_text(encoding="utf-8"))["steps"]]
    assert steps == ["tokenizer", "sft", "export_sft", "grpo", "export_grpo", "evaluate"]


@pytest.mark.slow
def test_fast_smoke_run_writes_every_artifact(tmp_path):
    """`--fast` (the smoke variant the CLI ships): the same steps and files, far fewer iterations (no score bound)."""
    out = tmp_path / "fast"
    proc = subprocess.run([sys.executable, "-m", "tinyllm_mcore.quickstart.rl", "--output-dir", str(out), "--fast"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert run["settings"]["grpo_iters"] == 10 and run["settings"]["sft_iters"] == 60
    for path in ("rl/eval.jsonl", "rl/eval.json", "rl/hf_sft/config.json", "rl/hf_grpo/model.safetensors",
                 "rl/reward_curve.png", "report.md", "checkpoints/grpo/latest_checkpointed_iteration.txt"):
        assert (out / path).is_file(), path
    again = subprocess.run([sys.executable, "-m", "tinyllm_mcore.quickstart.rl", "--output-dir", str(out), "--fast"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and again.stderr.strip().startswith("error: ") and "--overwrite" in again.stderr
