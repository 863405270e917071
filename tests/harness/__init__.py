"""Shared test helpers: tiny corpora and tokenizers, post-training fixtures, and the multi-process worker harness."""
