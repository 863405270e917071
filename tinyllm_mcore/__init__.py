"""tinyllm-mcore: the tiny-llm-zh Chinese small LLM on megatron-core."""
import warnings

# megatron-core warns at import that TE/apex are absent and it falls back to torch implementations: that is the
# expected configuration on CPU and non-TE GPUs, not something for users to act on.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex) (and Apex )?(are|is) not installed.*")
warnings.filterwarnings("ignore", message=r".*Apex is not installed.*")
warnings.filterwarnings("ignore", message=r".*full scope is deprecated.*")  # megatron's own TransformerConfig default
# torch deprecations hit by megatron's own checkpoint code (ShardedTensor, load_state_dict): printed on every
# checkpoint load, and only megatron can act on them
warnings.filterwarnings("ignore", category=FutureWarning, module=r"megatron\.core\.dist_checkpointing\..*")
warnings.filterwarnings("ignore", category=FutureWarning, message=r".*we are deprecating ShardedTensor.*")

# megatron-core 0.19's "GPTModel IS DEPRECATED" (GPTModel is supported) and similar log lines: runtime/compat.py
from tinyllm_mcore.runtime.compat import silence_known_noise  # noqa: E402

silence_known_noise()

__version__ = "0.1.0"
