"""Inference: decoding (the KV-cached decoder), generate (sampling, streaming, chat, loading a generator)."""
