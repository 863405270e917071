"""`python tools/chat.py` in a checkout runs the `tinyllm-chat` command:
its code is tinyllm_mcore/cli/chat.py (the package must be installed: `pip install -e .`)."""
from tinyllm_mcore.cli.chat import main

if __name__ == "__main__":
    raise SystemExit(main())
