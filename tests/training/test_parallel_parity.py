"""Same weights ⇒ same loss under every parallel layout, exact resume, and resharded checkpoints (CPU, gloo)."""
import pytest

from tests.harness.distributed import run_ranks

pytestmark = pytest.mark.distributed  # every test reads the multi-process results
COMMON = ["--model-size", "tiny", "--seq-length", "32", "--global-batch-size", "4", "--lr", "2e-3",
          "--min-lr", "2e-4", "--log-interval", "1", "--lr-warmup-iters", "1"]


def launch(runs, nproc):
    """The runs ({"name", "argv"}) in one launch of `nproc` ranks: {name: rank 0's losses}."""
    return run_ranks("tests.training.loop_worker:train_run", nproc,
                     cases={run["name"]: {k: v for k, v in run.items() if k != "name"} for run in runs})[0]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity")
    init, full, resumed = tmp / "init", tmp / "full", tmp / "half"
    five = COMMON + ["--train-iters", "5", "--load", str(init), "--finetune"]
    # One process: the initial weights, the TP1 reference, and the 10-vs-5+5 resume runs.
    single = launch([
        {"name": "init", "argv": COMMON + ["--train-iters", "0", "--micro-batch-size", "4", "--save", str(init)]},
        {"name": "tp1", "argv": five + ["--micro-batch-size", "4"]},
        {"name": "tp1_accum", "argv": five + ["--micro-batch-size", "1"]},
        # bf16: fp32 main weights live in the optimizer; a --finetune load must refresh them from the checkpoint
        {"name": "bf16_train", "argv": COMMON + ["--bf16", "--train-iters", "40", "--lr", "1e-2", "--micro-batch-size",
                                                 "4", "--eval-interval", "40", "--eval-iters", "2", "--load",
                                                 str(init), "--finetune", "--save", str(tmp / "bf16")]},
        {"name": "bf16_finetune", "argv": COMMON + ["--bf16", "--train-iters", "1", "--lr", "1e-9", "--min-lr",
                                                    "1e-9", "--lr-warmup-iters", "0", "--micro-batch-size", "4",
                                                    "--eval-interval", "1", "--eval-iters", "2", "--load",
                                                    str(tmp / "bf16"), "--finetune"]},
    ], nproc=1)
    # Two processes: TP2, PP2, DP2 (half micro-batch), VPP, distributed optimizer + sequence parallel, resume,
    # and a TP2 checkpoint re-evaluated at PP2.
    tp2_ckpt = tmp / "tp2_ckpt"
    double = launch([
        {"name": "tp2", "argv": five + ["--micro-batch-size", "4", "--tensor-model-parallel-size", "2"]},
        {"name": "pp2", "argv": five + ["--micro-batch-size", "2", "--pipeline-model-parallel-size", "2"]},
        {"name": "dp2", "argv": five + ["--micro-batch-size", "2"]},
        {"name": "vpp", "argv": five + ["--micro-batch-size", "1", "--pipeline-model-parallel-size", "2",
                                        "--num-layers-per-virtual-pipeline-stage", "1"]},
        {"name": "tp2_sp_distopt", "argv": five + ["--micro-batch-size", "4", "--tensor-model-parallel-size", "2",
                                                   "--sequence-parallel", "--use-distributed-optimizer"]},
        {"name": "dp2_distopt", "argv": five + ["--micro-batch-size", "2", "--use-distributed-optimizer"]},
        {"name": "full", "argv": COMMON + ["--train-iters", "10", "--micro-batch-size", "2", "--load", str(init),
                                           "--finetune", "--save", str(full)]},
        {"name": "first_half", "argv": COMMON + ["--train-iters", "10", "--exit-interval", "5", "--micro-batch-size",
                                                 "2", "--load", str(init), "--finetune", "--save", str(resumed)]},
        {"name": "second_half", "argv": COMMON + ["--train-iters", "10", "--micro-batch-size", "2", "--load",
                                                  str(resumed), "--save", str(resumed)]},
        {"name": "tp2_save", "argv": COMMON + ["--train-iters", "3", "--micro-batch-size", "4", "--eval-interval", "3",
                                               "--eval-iters", "2", "--tensor-model-parallel-size", "2", "--load",
                                               str(init), "--finetune", "--save", str(tp2_ckpt)]},
        {"name": "pp2_eval", "argv": COMMON + ["--train-iters", "3", "--micro-batch-size", "2", "--eval-iters", "2",
                                               "--pipeline-model-parallel-size", "2", "--load", str(tp2_ckpt),
                                               "--skip-train"]},
    ], nproc=2)
    return {**single, **double}


def test_first_iteration_and_five_steps_match_tp1(results):
    ref = results["tp1"]["train"]
    assert len(ref) == 5 and ref[-1] < ref[0]
    for name in ["tp1_accum", "tp2", "pp2", "dp2", "vpp", "tp2_sp_distopt", "dp2_distopt"]:
        got = results[name]["train"]
        assert abs(got[0] - ref[0]) < 1e-5, (name, got[0], ref[0])
        assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-4, (name, got, ref)


def test_loss_decreases_and_dp2_equals_doubled_micro_batch(results):
    full = results["full"]["train"]
    assert full[-1] < full[0] - 0.05, full
    # DP2 with micro-batch 2 and TP1 with micro-batch 4 see the same 4 samples per step
    assert results["dp2"]["train"] == pytest.approx(results["tp1"]["train"], abs=1e-5)


def test_resume_is_bit_identical(results):
    straight = results["full"]["train"]
    resumed = results["first_half"]["train"] + results["second_half"]["train"]
    assert len(results["first_half"]["train"]) == 5 and len(results["second_half"]["train"]) == 5
    assert resumed == straight  # exact, fp32 on CPU


def test_checkpoint_saved_at_tp2_evaluates_identically_at_pp2(results):
    saved_eval = results["tp2_save"]["valid"][-1]
    loaded_eval = results["pp2_eval"]["valid"][-1]
    assert abs(saved_eval - loaded_eval) < 1e-5, (saved_eval, loaded_eval)


def test_bf16_finetune_continues_from_the_loaded_weights(results):
    trained = results["bf16_train"]
    assert trained["valid"][-1] < trained["train"][0] - 0.1  # the checkpoint is clearly better than the init
    after_one_tiny_step = results["bf16_finetune"]["valid"][-1]
    assert abs(after_one_tiny_step - trained["valid"][-1]) < 0.02, (after_one_tiny_step, trained)
