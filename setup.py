"""tinyllm-mcore: the tiny-llm-zh Chinese small LLM trained with megatron-core (TP/PP/DP, also on CPU)."""
from setuptools import find_packages, setup

setup(
    name="tinyllm-mcore",
    version="0.1.0",
    description="tiny-llm-zh (16M-1.5B Chinese LLMs) on megatron-core: pretrain, SFT, reward, DPO, eval, HF export",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # tinyllm_mcore is the library; tools/, checkpoint_convert/ and benchmarks/ are script folders installed as
    # packages too so `python -m tools.preprocess_data` works from anywhere after `pip install`.
    packages=find_packages(include=["tinyllm_mcore", "tinyllm_mcore.*", "tools", "checkpoint_convert", "benchmarks"]),
    include_package_data=True,
    package_data={"": ["*.sh"]},
    install_requires=[
        # A range that the machine's CPU torch satisfies: pip then installs nothing more (no multi-GB CUDA pull).
        "torch>=2.4",
        # The tested range (runtime/compat.py): 0.16.1 is the newest on Python 3.11, 0.19.x what 3.12 gets (CI: both).
        "megatron-core>=0.16.1,<0.20",
        "packaging",
        "sentencepiece>=0.2",
        "transformers>=4.45",
        "datasets>=2.19",
        "safetensors>=0.4",
        "numpy",
        "tqdm",
        "tensorboard",
        # dist_checkpointing's async/process helpers hang on save without psutil (measured on 0.16.1).
        "psutil",
        # loss-curve PNGs in the quickstart report
        "matplotlib",
        # device_map="auto" in the HF quick-start flow users run on exports
        "accelerate",
    ],
    extras_require={
        "dev": ["pytest>=7", "pyarrow"],
        # GPU only: needs CUDA to build. Selected at run time when it imports and CUDA is present.
        "te": ["transformer-engine[pytorch]"],
        # lm-eval 0.4.x imports accelerate in its hf model but does not require it
        "eval": ["lm-eval>=0.4,<0.5", "accelerate"],
    },
)
