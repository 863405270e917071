"""tinyllm-mcore: the tiny-llm-zh Chinese small LLM trained with megatron-core (TP/PP/DP, also on CPU)."""
from setuptools import find_packages, setup

# command -> the `main(argv=None) -> int` it runs (tests/cli/test_packaging.py checks each one in the built wheel)
CONSOLE_SCRIPTS = {
    "tinyllm-train-tokenizer": "tinyllm_mcore.cli.train_tokenizer:main",
    "tinyllm-preprocess-data": "tinyllm_mcore.cli.preprocess_data:main",
    "tinyllm-merge-datasets": "tinyllm_mcore.cli.merge_datasets:main",
    "tinyllm-pretrain": "tinyllm_mcore.stages.pretrain:main",
    "tinyllm-sft": "tinyllm_mcore.stages.sft:main",
    "tinyllm-dpo": "tinyllm_mcore.stages.dpo:main",
    "tinyllm-reward": "tinyllm_mcore.stages.reward:main",
    "tinyllm-grpo": "tinyllm_mcore.stages.grpo:main",
    "tinyllm-chat": "tinyllm_mcore.cli.chat:main",
    "tinyllm-generate": "tinyllm_mcore.cli.generate:main",
    "tinyllm-evaluate": "tinyllm_mcore.cli.evaluate:main",
    "tinyllm-mcore-to-hf": "tinyllm_mcore.cli.mcore_to_hf:main",
    "tinyllm-hf-to-mcore": "tinyllm_mcore.cli.hf_to_mcore:main",
    "tinyllm-quickstart": "tinyllm_mcore.quickstart.__main__:main",
    "tinyllm-quickstart-rl": "tinyllm_mcore.quickstart.rl:main",
}

# Experiment trackers (training/metrics.py), each optional and asked for by its flag: --wandb-project,
# --mlflow-tracking-uri, --swanlab-project. Lower bounds are the releases tested (tests/training/test_tracking.py).
TRACKERS = {
    "wandb": ["wandb>=0.31,<1"],
    # mlflow-skinny is MLflow's tracking client and stores without its UI server and model flavors (the full package
    # adds pandas, pyarrow, flask...); sqlalchemy and alembic make its sqlite store work without a server.
    "mlflow": ["mlflow-skinny>=3.18,<4", "sqlalchemy>=2,<3", "alembic>=1.13,<2"],
    # swanlab (every release since 0.6) requires protobuf < 7, but sentencepiece 0.2.3's generated model module
    # refuses a protobuf runtime older than 7.36, and our HF tokenizer folders are built from it: with swanlab,
    # sentencepiece stays below 0.2.3 (0.2.2's module works with protobuf 6). So `dev` leaves swanlab out (CI keeps
    # the newest sentencepiece and protobuf 7); its test joins the others where it is installed.
    "swanlab": ["swanlab>=0.10.3,<0.11", "sentencepiece>=0.2,<0.2.3"],
}

setup(
    name="tinyllm-mcore",
    version="0.1.0",
    description="tiny-llm-zh (16M-1.5B Chinese LLMs) on megatron-core: pretrain, SFT, reward, DPO, eval, HF export",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # Only the library is installed: tools/, checkpoint_convert/ and benchmarks/ are scripts for a checkout that import
    # it, and every command is also a console script below.
    packages=find_packages(include=["tinyllm_mcore", "tinyllm_mcore.*"]),
    entry_points={"console_scripts": [f"{name}={target}" for name, target in CONSOLE_SCRIPTS.items()]},
    include_package_data=True,
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
        # the chat template is checked by rendering it as transformers does (tokenizer_files.py)
        "jinja2>=3.1",
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
        # verifiable tasks and answer checking for RL with verifiable rewards (data/verifiable_prompts.py)
        "rl": ["reasoning-gym>=0.1.25,<0.2", "math-verify>=0.9,<1"],
        **TRACKERS,
        # loading an exported LoRA adapter (tinyllm-mcore-to-hf --peft-adapter) with Hugging Face PEFT
        "lora": ["peft>=0.13,<1"],
        # the tests cover the RL data sources, the trackers and the PEFT export too
        "dev": ["pytest>=7", "pyarrow", "reasoning-gym>=0.1.25,<0.2", "math-verify>=0.9,<1", "peft>=0.13,<1",
                *(requirement for name, requirements in TRACKERS.items() if name != "swanlab"
                  for requirement in requirements)],
        # GPU only: needs CUDA to build. Selected at run time when it imports and CUDA is present.
        "te": ["transformer-engine[pytorch]"],
        # lm-eval 0.4.x imports accelerate in its hf model but does not require it
        "eval": ["lm-eval>=0.4,<0.5", "accelerate"],
    },
)
