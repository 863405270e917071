"""`python tools/evaluate.py` in a checkout runs the `tinyllm-evaluate` command:
its code is tinyllm_mcore/cli/evaluate.py (the package must be installed: `pip install -e .`)."""
from tinyllm_mcore.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
