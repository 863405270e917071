"""tinyllm-mcore: the tiny-llm-zh Chinese small LLM on megatron-core."""

# First, before any library is imported: the libraries' own warnings (megatron's "Transformer Engine and Apex are not
# installed", deprecations, ...) stay off the terminal unless a command is run with --verbose (runtime/quiet.py).
from tinyllm_mcore.runtime import quiet as _quiet

_quiet.install()

__version__ = "0.1.0"
