"""Command-line entry points.

Each module here is one command: `def main(argv=None) -> int` parses its flags and returns the exit status, and
`python -m tinyllm_mcore.cli.<name>`, the `tinyllm-<name>` console script (setup.py) and the checkout script
`tools/<name>.py` all call that same function.
"""
