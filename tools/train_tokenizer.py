"""`python tools/train_tokenizer.py` in a checkout runs the `tinyllm-train-tokenizer` command:
its code is tinyllm_mcore/cli/train_tokenizer.py (the package must be installed: `pip install -e .`)."""
from tinyllm_mcore.cli.train_tokenizer import main

if __name__ == "__main__":
    raise SystemExit(main())
