"""`python tools/merge_datasets.py` in a checkout runs the `tinyllm-merge-datasets` command:
its code is tinyllm_mcore/cli/merge_datasets.py (the package must be installed: `pip install -e .`)."""
from tinyllm_mcore.cli.merge_datasets import main

if __name__ == "__main__":
    raise SystemExit(main())
