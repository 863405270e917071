"""Checkpoints: io (save/load), safety (manifest, lock), formats, metadata."""
