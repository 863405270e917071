"""Save → resume and save → reshard → evaluate as a matrix, the way real jobs combine the flags:
{plain, distributed optimizer} × {DP1, DP2, TP2, PP2} × {fp32, bf16}, all with dropout on.

Each cell trains 6 iterations with a save (and an evaluation) at iteration 3, resumes from that save, and checks that
the resumed iterations 4–6 equal the uninterrupted ones bit for bit (RNG, optimizer, LR, data position restored).
The iteration-3 checkpoint is then evaluated at another layout and must give the same validation loss. Across
layouts: a distributed-optimizer checkpoint resumes at another DP size (and, saved fully reshardable, at another
TP/PP); where megatron's format cannot follow, the load is refused with one line.

Three launches (1 process, 2 processes, 1 process) so checkpoints move between world sizes.
"""
import pytest

from tests.harness.distributed import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

COMMON = ["--model-size", "tiny", "--seq-length", "32", "--global-batch-size", "4", "--lr", "1e-2", "--min-lr",
          "1e-3", "--log-interval", "1", "--lr-warmup-iters", "1", "--hidden-dropout", "0.1", "--attention-dropout",
          "0.1", "--eval-iters", "2"]
# layout -> (processes, flags); micro-batches chosen so every layout sees the same 4 samples per step
LAYOUTS = {
    "dp1": (1, ["--micro-batch-size", "4"]),
    "dp2": (2, ["--micro-batch-size", "2"]),
    "tp2": (2, ["--micro-batch-size", "4", "--tensor-model-parallel-size", "2"]),
    "pp2": (2, ["--micro-batch-size", "2", "--pipeline-model-parallel-size", "2"]),
}
OPTIMIZERS = {"plain": [], "distopt": ["--use-distributed-optimizer"]}
PRECISIONS = {"fp32": [], "bf16": ["--bf16"]}
RESHARD_EVAL = {"dp1": "tp2", "dp2": "pp2", "tp2": "dp1", "pp2": "dp2"}  # where each cell's checkpoint is evaluated
CELLS = [(lay, opt, prec) for lay in LAYOUTS for opt in OPTIMIZERS for prec in PRECISIONS]


def cell_name(layout, optimizer, precision):
    return f"{layout}-{optimizer}-{precision}"


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt_matrix")
    runs = {1: [[], []], 2: [[], []]}  # processes -> [runs before the other world size's, runs after]

    def flags(layout, optimizer, precision):
        return COMMON + LAYOUTS[layout][1] + OPTIMIZERS[optimizer] + PRECISIONS[precision]

    def ckpt(cell):
        return tmp / cell

    for layout, optimizer, precision in CELLS:
        cell = cell_name(layout, optimizer, precision)
        nproc = LAYOUTS[layout][0]
        base = flags(layout, optimizer, precision)
        runs[nproc][0].append({"name": f"{cell}/full", "argv": base + [
            "--train-iters", "6", "--save", str(ckpt(cell)), "--save-interval", "3", "--eval-interval", "3"]})
        runs[nproc][0].append({"name": f"{cell}/resume", "argv": base + [
            "--train-iters", "6", "--load", str(ckpt(cell) / "iter_0000003")]})
        target = RESHARD_EVAL[layout]
        phase = 0 if LAYOUTS[target][0] == 2 and nproc == 2 else 1
        runs[LAYOUTS[target][0]][phase].append({"name": f"{cell}/eval@{target}", "argv": flags(
            target, optimizer, precision) + ["--train-iters", "6", "--skip-train", "--load",
                                             str(ckpt(cell) / "iter_0000003")]})

    def distopt(layout, extra=()):  # across layouts dropout masks differ by construction: compare without it
        return flags(layout, "distopt", "fp32") + ["--hidden-dropout", "0", "--attention-dropout", "0"] + list(extra)

    # Distributed-optimizer state across DP sizes (dp_reshardable), and across TP/PP when saved fully reshardable.
    for layout in ("dp1", "dp2"):
        runs[LAYOUTS[layout][0]][0].append({"name": f"{layout}-nodrop/full", "argv": distopt(layout, [
            "--train-iters", "6", "--save", str(tmp / f"{layout}-nodrop"), "--save-interval", "3"])})
    runs[1][1].append({"name": "dp2->dp1", "argv": distopt("dp1", [
        "--train-iters", "6", "--load", str(tmp / "dp2-nodrop" / "iter_0000003")])})
    runs[2][1].append({"name": "dp1->dp2", "argv": distopt("dp2", [
        "--train-iters", "6", "--load", str(tmp / "dp1-nodrop" / "iter_0000003")])})
    full_resh = tmp / "tp2-fully-reshardable"
    runs[2][1] += [
        {"name": "tp2-fully/full", "argv": distopt("tp2", [
            "--train-iters", "6", "--save", str(full_resh), "--save-interval", "3",
            "--dist-ckpt-optim-fully-reshardable"])},
        {"name": "tp2-fully->pp2", "argv": distopt("pp2", [
            "--train-iters", "6", "--load", str(full_resh / "iter_0000003")])},
        {"name": "tp2-fully->dp2", "argv": distopt("dp2", [
            "--train-iters", "6", "--load", str(full_resh / "iter_0000003")])},
        # refused with one line: dp_reshardable at another TP/PP, distributed state into the plain optimizer
        {"name": "tp2-dp_reshardable->pp2", "expect_error": True, "argv": distopt("pp2", [
            "--train-iters", "6", "--load", str(ckpt("tp2-distopt-fp32") / "iter_0000003")])},
        {"name": "distopt->plain", "expect_error": True, "argv": flags("dp2", "plain", "fp32") + [
            "--train-iters", "6", "--load", str(ckpt("dp2-distopt-fp32") / "iter_0000003")]},
        {"name": "plain->distopt", "expect_error": True, "argv": distopt("dp2", [
            "--train-iters", "6", "--load", str(ckpt("dp2-plain-fp32") / "iter_0000003")])},
        # weights only: always possible
        {"name": "distopt->plain --no-load-optim", "argv": flags("dp2", "plain", "fp32") + [
            "--train-iters", "4", "--no-load-optim", "--load", str(ckpt("tp2-distopt-bf16") / "iter_0000003")]},
        {"name": "distopt->plain --finetune", "argv": flags("tp2", "plain", "fp32") + [
            "--train-iters", "2", "--finetune", "--skip-train", "--load",
            str(ckpt("dp2-distopt-fp32") / "iter_0000003")]},
    ]
    out = {}
    out.update(launch(runs[1][0], nproc=1))
    out.update(launch(runs[2][0] + runs[2][1], nproc=2, timeout=1200))
    out.update(launch(runs[1][1], nproc=1))
    return out


def launch(runs, nproc, timeout=600):
    """The runs ({"name", "argv", "expect_error"?}) in one launch of `nproc` ranks: {name: rank 0's result}."""
    return run_ranks("tests.training.loop_worker:train_run", nproc, timeout=timeout,
                     cases={run["name"]: {k: v for k, v in run.items() if k != "name"} for run in runs})[0]


@pytest.mark.parametrize("layout,optimizer,precision", CELLS, ids=[cell_name(*c) for c in CELLS])
def test_resume_repeats_the_uninterrupted_run(matrix, layout, optimizer, precision):
    cell = cell_name(layout, optimizer, precision)
    full, resumed = matrix[f"{cell}/full"]["train"], matrix[f"{cell}/resume"]["train"]
    assert len(full) == 6 and len(resumed) == 3
    assert resumed == full[3:], (full, resumed)  # bit-exact, dropout included


@pytest.mark.parametrize("layout,optimizer,precision", CELLS, ids=[cell_name(*c) for c in CELLS])
def test_checkpoint_evaluates_identically_at_another_layout(matrix, layout, optimizer, precision):
    cell = cell_name(layout, optimizer, precision)
    saved = matrix[f"{cell}/full"]["valid"][0]  # validation at iteration 3, right before the save
    resharded = matrix[f"{cell}/eval@{RESHARD_EVAL[layout]}"]["valid"][0]
    tolerance = 1e-5 if precision == "fp32" else 2e-2  # bf16 sums in another order at another layout
    assert abs(saved - resharded) < tolerance, (saved, resharded)


def test_distributed_optimizer_state_moves_between_dp_sizes(matrix):
    for name, source in [("dp2->dp1", "dp2-nodrop"), ("dp1->dp2", "dp1-nodrop")]:
        expected = matrix[f"{source}/full"]["train"][3:]
        assert matrix[name]["train"] == pytest.approx(expected, abs=1e-5), name


def test_fully_reshardable_state_moves_between_tp_pp_and_dp(matrix):
    expected = matrix["tp2-fully/full"]["train"]
    assert expected[:3] == pytest.approx(matrix["dp2-nodrop/full"]["train"][:3], abs=1e-4)
    for name in ["tp2-fully->pp2", "tp2-fully->dp2"]:
        assert matrix[name]["train"] == pytest.approx(expected[3:], abs=1e-4), name


def test_loads_megatron_cannot_follow_are_refused_in_one_line(matrix):
    messages = {k: matrix[k]["error"] for k in ["tp2-dp_reshardable->pp2", "distopt->plain", "plain->distopt"]}
    assert "saved at TP=2 PP=1 and loads only there" in messages["tp2-dp_reshardable->pp2"]
    assert "--dist-ckpt-optim-fully-reshardable" in messages["tp2-dp_reshardable->pp2"]
    assert "add --use-distributed-optimizer" in messages["distopt->plain"]
    assert "saved without the distributed optimizer" in messages["plain->distopt"]
    for message in messages.values():
        assert "\n" not in message and "--no-load-optim" in message


def test_weights_of_a_distributed_optimizer_checkpoint_load_without_it(matrix):
    # --no-load-optim resumes the counters (iteration 4 is the first) with a fresh plain optimizer
    assert len(matrix["distopt->plain --no-load-optim"]["train"]) == 1
    # --finetune takes the weights alone: they evaluate as the saved model did
    assert matrix["distopt->plain --finetune"]["valid"][0] == pytest.approx(
        matrix["dp2-distopt-fp32/full"]["valid"][0], abs=1e-5)
