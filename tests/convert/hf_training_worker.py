"""Run by the harness (tests.harness.distributed.run_ranks) in every rank: one real pretrain run per case, as the CLI
runs it (its parser, its tokenizer loading, the loop) but leaving the harness's process group alone."""
from tinyllm_mcore.stages.pretrain import STAGE
from tinyllm_mcore.training.batches import load_tokenizer
from tinyllm_mcore.training.loop import parse_args, train


def pretrain_run(argv: list[str], expect_error: bool = False) -> dict:
    """{"train": the lm loss of every iteration}; a run expected to be refused returns {"error": this rank's one
    line}."""
    args = parse_args(STAGE, argv)
    try:
        out = train(STAGE, args, load_tokenizer(args))
    except ValueError as e:
        if not expect_error:
            raise
        return {"error": str(e)}
    return {"train": [r["lm loss"] for r in out["history"] if r["split"] == "train"]}


def pretrain_run_hf_disk_full(argv: list[str]) -> dict:
    """A run whose HF folder write meets a full disk on rank 0 (fault injection: the export's writer raises
    ENOSPC after a partial file): {"error": the one-line error this rank raised}."""
    import errno

    from tinyllm_mcore.convert import in_training

    def disk_full(staged, *args, **kwargs):
        (staged / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    original, in_training.write_hf_export = in_training.write_hf_export, disk_full
    try:
        return pretrain_run(argv, expect_error=True)
    finally:
        in_training.write_hf_export = original
