"""Hugging Face model directory -> megatron-core checkpoint (a checkout's script for `tinyllm-hf-to-mcore`)."""
from tinyllm_mcore.cli.hf_to_mcore import main

if __name__ == "__main__":
    raise SystemExit(main())
