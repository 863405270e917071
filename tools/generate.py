"""`python tools/generate.py` in a checkout runs the `tinyllm-generate` command:
its code is tinyllm_mcore/cli/generate.py (the package must be installed: `pip install -e .`)."""
from tinyllm_mcore.cli.generate import main

if __name__ == "__main__":
    raise SystemExit(main())
