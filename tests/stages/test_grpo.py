"""GRPO: the same rollouts give the same steps at every layout (TP2, PP2, DP2 vs TP1, with and without the KL
reference), a run saved at one layout resumes at another, and bad input is one error line."""
import json

import pytest

from tests.harness import arithmetic as data
from tests.harness.cli import one_error_line

# 16 prompts a step: enough that the SFT model's own samples give some group a learning signal
REAL = ["--global-batch-size", "128"]
KEYS = ("grpo loss", "policy loss", "reward mean", "accuracy", "zero-variance groups", "grad_norm")


@pytest.mark.distributed
@pytest.mark.slow
def test_grpo_layouts_agree_and_resume_across_layouts(tmp_path):
    from tests.harness.distributed import run_ranks

    ckpt = data.checkpoints()
    env = {"TINYLLM_TEST_TOKENIZER": data.tokenizer().model_path}
    cases = "tests.stages.grpo_cases:grpo_steps"
    sft, init = str(ckpt["sft"]), str(ckpt["init"])
    one = run_ranks(None, 1, env=env, cases={
        "tp1": (cases, {"load": sft, "flags": [], "iterations": 4}),
        "tp1_kl": (cases, {"load": sft, "flags": [], "iterations": 2, "ref_load": init}),
        "tp1_real": (cases, {"load": sft, "flags": REAL, "iterations": 2, "real_rollouts": True}),
    })[0]
    layouts = {"dp2": [], "tp2": ["--tensor-model-parallel-size", "2"], "pp2": ["--pipeline-model-parallel-size", "2"]}
    saved = str(tmp_path / "tp2_saved")
    cases2 = {name: (cases, {"load": sft, "flags": flags, "iterations": 4}) for name, flags in layouts.items()}
    cases2.update({f"{name}_kl": (cases, {"load": sft, "flags": flags, "iterations": 2, "ref_load": init})
                   for name, flags in layouts.items() if name != "dp2"})
    # the same 4-iteration schedule, stopped (and saved) after 2 by --exit-interval
    cases2["tp2_save"] = (cases, {"load": sft, "flags": [*layouts["tp2"], "--exit-interval", "2"], "iterations": 4,
                                  "save": saved})
    cases2["pp2_resume"] = (cases, {"load": saved, "flags": layouts["pp2"], "iterations": 4, "resume": True})
    # the stage's own rollouts (the KV-cache decoder on the live weights) at TP2 and PP2: the same samples as TP1's
    cases2.update({f"{name}_real": (cases, {"load": sft, "flags": [*flags, *REAL], "iterations": 2,
                                               "real_rollouts": True})
                   for name, flags in layouts.items() if name != "dp2"})
    two = run_ranks(None, 2, env=env, cases=cases2)[0]

    base = one["tp1"]
    assert len(base) == 4 and base[0]["zero-variance groups"] < 1  # the rollouts carry a learning signal
    assert base[-1]["grpo loss"] != pytest.approx(base[0]["grpo loss"], abs=1e-4)  # the weights move
    for name in layouts:
        for step, (got, want) in enumerate(zip(two[name], base)):
            for key in KEYS:
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), (name, step, key)
    kl_base = one["tp1_kl"]
    assert kl_base[-1]["kl"] > 1e-4  # policy and reference differ: the KL term is not zeros
    for name in ("tp2_kl", "pp2_kl"):
        for step, (got, want) in enumerate(zip(two[name], kl_base)):
            for key in (*KEYS, "kl"):
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), (name, step, key)
    real = one["tp1_real"]
    assert real[0]["response length"] > 0 and min(r["zero-variance groups"] for r in real) < 1
    for name in ("tp2_real", "pp2_real"):
        for step, (got, want) in enumerate(zip(two[name], real)):
            for key in (*KEYS, "response length"):  # a step whose groups all tie has no loss and no grad norm
                assert got.get(key) == pytest.approx(want.get(key), rel=1e-4, abs=1e-5, nan_ok=True), \
                    (name, step, key)
    resumed = two["tp2_save"] + two["pp2_resume"]
    assert [r["iteration"] for r in resumed] == [1, 2, 3, 4]
    for step, (got, want) in enumerate(zip(resumed, base)):
        for key in KEYS:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), ("resumed", step, key)


def _grpo(*flags, check=False):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "tinyllm_mcore.stages.grpo", *flags], capture_output=True,
                          text=True, timeout=300)


def _flags(*extra):
    return data.common_flags("--micro-batch-size", "8", "--global-batch-size", "16", "--group-size", "8",
                             "--max-new-tokens", "4", "--train-iters", "2", *extra)


@pytest.mark.parametrize("flags, fragments", [
    (("--task", "chain_summ", "--load", "X"), ("--task chain_summ", "chain_sum")),
    (("--task", "chain_sum", "--group-size", "1", "--load", "X"), ("--group-size 1", "at least 2")),
    (("--task", "chain_sum", "--prompts", "p.jsonl", "--load", "X"), ("exactly one prompt source",)),
    (("--task", "chain_sum"), ("--load",)),
])
def test_bad_flags_are_one_error_line(flags, fragments):
    one_error_line(_grpo(*_flags(*flags)), *fragments)


def test_empty_prompts_file_is_one_error_line(tmp_path):
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("\n")
    one_error_line(_grpo(*_flags("--prompts", str(empty), "--load", "X")), str(empty), "no prompts")


@pytest.mark.slow
def test_reference_of_another_model_and_no_correct_answer_stop_the_run(tmp_path):
    """A --ref-load of another model is refused before training; a run whose samples are never right stops with
    an error after --max-zero-accuracy-intervals log intervals (not a flat curve)."""
    ckpt = data.checkpoints()
    other = tmp_path / "other"
    from tinyllm_mcore.stages import sft
    data.run_stage(sft.make_stage(data.sft_provider(data.train_records(8))),
                   [*data.common_flags("--micro-batch-size", "8"), "--model-size", "16m", "--train-iters", "0",
                    "--save", str(other)])
    task = data.TASK_FLAGS
    one_error_line(_grpo(*_flags(*task, "--load", str(ckpt["sft"]), "--finetune", "--kl-beta", "0.1",
                                 "--ref-load", str(other))), "--ref-load", "16m")
    impossible = tmp_path / "impossible.jsonl"
    impossible.write_text("".join(json.dumps({"prompt": r["question"], "answer": "never"}) + "\n"
                                  for r in data.train_records(16)))
    proc = _grpo(*_flags("--prompts", str(impossible), "--system-prompt", "", "--load", str(ckpt["sft"]),
                         "--finetune", "--train-iters", "10", "--log-interval", "2",
                         "--max-zero-accuracy-intervals", "2"))
    one_error_line(proc, "no sampled response was correct in the last 4 steps", "--max-zero-accuracy-intervals")
