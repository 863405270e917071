"""megatron-core checkpoint -> Hugging Face model directory (a checkout's script for `tinyllm-mcore-to-hf`)."""
from tinyllm_mcore.cli.mcore_to_hf import main

if __name__ == "__main__":
    raise SystemExit(main())
