"""Inference: decoding (KV-cached decoder), generate (sampling, chat), open (the one open-for-inference)."""
