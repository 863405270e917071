"""Inference: decoding (the KV-cached decoder), generate (sampling, streaming, chat), open (the one way to open a
checkpoint for inference: generate, chat, evaluation, the quickstart)."""
