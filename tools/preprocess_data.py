"""`python tools/preprocess_data.py` in a checkout runs the `tinyllm-preprocess-data` command:
its code is tinyllm_mcore/cli/preprocess_data.py (the package must be installed: `pip install -e .`)."""
from tinyllm_mcore.cli.preprocess_data import main

if __name__ == "__main__":
    raise SystemExit(main())
