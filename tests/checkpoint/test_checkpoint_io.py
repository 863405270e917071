"""Crash safety: a save that dies midway never moves the latest pointer onto a partial checkpoint."""
import pytest

from tests.harness.progression_data import progression_datasets
from tinyllm_mcore.training.batches import lm_forward_step
from tinyllm_mcore.runtime import distributed as rt
from tinyllm_mcore.checkpoint import io as ckpt
from tinyllm_mcore.training.loop import Stage, parse_args, train

STAGE = Stage("pretrain", progression_datasets, lm_forward_step)


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from megatron.core import dist_checkpointing

    root = tmp_path / "ckpt"
    args = parse_args(STAGE, ["--model-size", "tiny", "--seq-length", "32", "--micro-batch-size", "2",
                              "--train-iters", "2", "--lr-warmup-iters", "0", "--mock-data", "--save", str(root)])
    try:
        out = train(STAGE, args)
        assert ckpt.resolve_load_dir(root) == ckpt.iteration_dir(root, 2)
        real_save = dist_checkpointing.save

        def dies_midway(state, path, *a, **k):  # some shards written, then the process is gone
            (ckpt.iteration_dir(root, 3) / "__0_0.distcp").write_bytes(b"partial")
            raise KeyboardInterrupt("killed during save")

        monkeypatch.setattr(dist_checkpointing, "save", dies_midway)
        with pytest.raises(KeyboardInterrupt):
            ckpt.save_checkpoint(str(root), 3, out["chunks"], None, None, consumed_samples=6)
        assert (root / ckpt.TRACKER).read_text() == "2"
        assert ckpt.resolve_load_dir(root) == ckpt.iteration_dir(root, 2)
        with pytest.raises(ckpt.CheckpointError, match="not a checkpoint directory"):
            ckpt.resolve_load_dir(ckpt.iteration_dir(root, 3))  # the partial directory is never taken for one

        monkeypatch.setattr(dist_checkpointing, "save", real_save)  # the next save of that iteration replaces it
        ckpt.save_checkpoint(str(root), 3, out["chunks"], None, None, consumed_samples=6)
        assert ckpt.resolve_load_dir(root) == ckpt.iteration_dir(root, 3)
        assert not (ckpt.iteration_dir(root, 3) / "__0_0.distcp").read_bytes() == b"partial"
    finally:
        rt.destroy()


def test_the_latest_pointer_is_parsed_in_one_place(tmp_path):
    from tinyllm_mcore.checkpoint import safety

    assert safety.read_tracker(tmp_path) is None
    for text, value in (("7\n", 7), ("release", "release")):
        (tmp_path / ckpt.TRACKER).write_text(text)
        assert safety.read_tracker(tmp_path) == value
    (tmp_path / ckpt.TRACKER).write_text("x7")
    with pytest.raises(ckpt.CheckpointError, match="holds 'x7', not an iteration number"):
        ckpt.resolve_load_dir(tmp_path)
    (tmp_path / "iter_0000001").mkdir()  # a save that died: a garbled pointer vouches for nothing, as before
    assert safety.remove_incomplete(tmp_path) == [tmp_path / "iter_0000001"]
