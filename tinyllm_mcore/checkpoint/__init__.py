"""Checkpoints: io (dist_checkpointing save/load, resharding), formats (the distributed optimizer's), metadata (the
versioned record of the run a checkpoint holds), safety (manifest, save lock, latest pointer)."""


class CheckpointError(ValueError):
    """A --load path that is not a usable checkpoint (reported as one line by the CLIs)."""
