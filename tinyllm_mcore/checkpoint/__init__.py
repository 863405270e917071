"""Checkpoints: io (dist_checkpointing save/load, resharding, optimizer formats), safety (manifest, save lock)."""
