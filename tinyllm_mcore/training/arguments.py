"""One Megatron-style argument parser shared by every stage (pretrain, SFT, reward, DPO).

Flag names follow Megatron-LM so existing launch scripts read naturally. Stages add their own flags through
`extra_args(parser)`. Defaults are the seed's (lr 3e-4 cosine, weight decay 0.01, clip 1.0, seq 1024).
"""
from __future__ import annotations

import argparse

from tinyllm_mcore.checkpoint.io import add_load_check_flags
from tinyllm_mcore.model.lora import add_lora_flags, settings_from_args
from tinyllm_mcore.model.presets import PRESETS
from tinyllm_mcore.runtime.quiet import add_verbose_flag
from tinyllm_mcore.training.metrics import Tracking


def build_parser(description: str, extra_args=None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, allow_abbrev=False)

    g = p.add_argument_group("model")
    g.add_argument("--model-size", default="92m", choices=list(PRESETS), help="preset from the seed's size table")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="logical vocab (default: the tokenizer's, else the preset's 64798)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--transformer-impl", choices=["auto", "local", "transformer_engine"], default="auto",
                   help="layer spec: TE when it imports and CUDA is present (auto), or force one")
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--recompute-activations", action="store_true", help="full activation recomputation")
    # MoE (Qwen2-MoE layout); the architecture flags override the preset and are stored with it in checkpoints
    g.add_argument("--num-experts", type=int, default=None,
                   help="routed experts per layer (default: the preset's; 0 = dense MLP)")
    g.add_argument("--moe-router-topk", type=int, default=None, help="experts per token (default: the preset's)")
    g.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None,
                   help="width of the gated shared expert (default: the preset's; 0 = none)")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=1e-2,
                   help="load-balancing (switch) aux loss coefficient; 0 disables it")
    g.add_argument("--moe-expert-capacity-factor", type=float, default=None,
                   help="token dropping: each expert takes at most factor x tokens x topk / experts tokens per "
                        "micro-batch, lowest-probability assignments dropped (default: no dropping)")

    add_lora_flags(p)

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")

    g = p.add_argument_group("batch and schedule")
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="default: micro-batch x data-parallel size (no gradient accumulation)")
    g.add_argument("--seq-length", type=int, default=1024)
    g.add_argument("--train-iters", type=int, default=1000)
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--min-lr", type=float, default=None,
                   help="LR at the end of the decay (default: --lr / 10, the seed's 3e-4 -> 3e-5 for any --lr)")
    g.add_argument("--lr-decay-style", choices=["cosine", "linear", "constant", "inverse-square-root", "WSD"],
                   default="cosine")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--lr-warmup-iters", type=int, default=None)
    g.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="warmup as a fraction of decay iters (seed: 0.05 pretrain, 0.03 SFT); default 0.05")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)

    g = p.add_argument_group("precision")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--loss-scale", type=float, default=None, help="static fp16 loss scale (default dynamic)")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="indexed-dataset prefixes, optionally weighted: 'w1 prefix1 w2 prefix2'")
    g.add_argument("--split", default="969,30,1", help="train,valid,test weights over each prefix's documents")
    g.add_argument("--mock-data", action="store_true", help="megatron's MockGPTDataset (no files needed)")
    g.add_argument("--tokenizer-model", default=None, help="sentencepiece model (or tokenizer dir)")
    g.add_argument("--tokenizer-type", default="auto")
    g.add_argument("--data-cache-path", default=None, help="where megatron caches dataset indices")

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--finetune", action="store_true",
                   help="load model weights only: reset iteration, optimizer, LR schedule and RNG")
    g.add_argument("--save-hf", action="store_true",
                   help="with every checkpoint, also write its Hugging Face folder SAVE/iter_N/hf (safetensors fp32, "
                        "config, tokenizer, chat template: what tinyllm-mcore-to-hf writes), checksummed with it")
    g.add_argument("--load-hf", default=None, metavar="DIR",
                   help="start from a Hugging Face folder (safetensors; its model must be --model-size's, its "
                        "tokenizer this run's) as --load X --finetune does: iteration 0, fresh optimizer")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    add_load_check_flags(g)  # --no-verify-checkpoint, --require-manifest, --allow-tokenizer-change
    g.add_argument("--dist-ckpt-optim-fully-reshardable", action="store_true",
                   help="save distributed-optimizer state gathered into model space (loads at any TP/PP/DP, and "
                        "without the distributed optimizer); default: per-DP-rank buckets (loads at any DP, same "
                        "TP/PP, no gather)")
    g.add_argument("--distrib-optim-fully-reshardable-mem-efficient", action="store_true",
                   help="with --dist-ckpt-optim-fully-reshardable: gather on DP rank 0 over gloo (less memory, "
                        "serial write)")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on --exit-signal (any rank), every rank saves after the current iteration and exits 0 "
                        "(Slurm: #SBATCH --signal=TERM@120 before the time limit)")
    g.add_argument("--exit-signal", default="SIGTERM",
                   help="signal name for --exit-signal-handler (SIGTERM, SIGUSR1, SIGUSR2, SIGINT)")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save and exit once this many minutes have passed since the start (checked every iteration)")

    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--metrics-jsonl", default=None, help="also append every logged record to this JSONL file")
    # Experiment trackers (Megatron-LM's --wandb-* flags): the same scalars as TensorBoard, from the logging rank.
    g.add_argument("--wandb-project", default=None,
                   help="log to Weights & Biases (pip install \".[wandb]\"): offline, files to `wandb sync` later, "
                        "unless WANDB_API_KEY or WANDB_MODE is set")
    g.add_argument("--wandb-exp-name", default=None, help="the W&B run's name (default: W&B picks one)")
    g.add_argument("--wandb-save-dir", default=None, help="W&B's local files (default: SAVE/wandb, else ./wandb)")
    g.add_argument("--wandb-entity", default=None, help="the W&B team or user the run belongs to")
    g.add_argument("--mlflow-tracking-uri", default=None,
                   help="log to MLflow (pip install \".[mlflow]\"): sqlite:///PATH.db (no server), a file store "
                        "file:DIR, or a tracking server http://HOST:PORT")
    g.add_argument("--mlflow-experiment", default="tinyllm-mcore", help="MLflow experiment name")
    g.add_argument("--mlflow-run-name", default=None, help="the MLflow run's name (default: MLflow picks one)")
    g.add_argument("--swanlab-project", default=None,
                   help="log to SwanLab (pip install \".[swanlab]\"): offline, files to `swanlab sync` later, unless "
                        "SWANLAB_API_KEY or SWANLAB_MODE is set (or --swanlab-mode)")
    g.add_argument("--swanlab-exp-name", default=None, help="the SwanLab experiment's name")
    g.add_argument("--swanlab-save-dir", default=None,
                   help="SwanLab's local files (default: SAVE/swanlog, else ./swanlog)")
    g.add_argument("--swanlab-mode", choices=["online", "offline", "local", "disabled"], default=None,
                   help="SwanLab's mode (default: online with SWANLAB_API_KEY, else offline)")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device peak TFLOP/s for MFU (default: known GPU table, or measured matmul peak on CPU)")
    g.add_argument("--max-skipped-iters", type=int, default=10,
                   help="abort after this many iterations with a NaN/inf loss (each is skipped and reported)")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--skip-train", action="store_true", help="load, evaluate the validation split once, exit")
    g.add_argument("--exit-interval", type=int, default=None, help="stop (after saving) at this iteration")
    add_verbose_flag(g)

    if extra_args is not None:
        extra_args(p)
    return p


def validate(args: argparse.Namespace, *, needs_data_path: bool = True) -> argparse.Namespace:
    """Checks that need no process group; fills the defaults that depend on other flags. Raises ValueError."""
    if args.bf16 and args.fp16:
        raise ValueError("--bf16 and --fp16 are mutually exclusive")
    if needs_data_path and not args.mock_data and not args.data_path:
        raise ValueError("give --data-path PREFIX [...] or --mock-data")
    # A fixed default min-lr would exceed a small --lr (DPO's 1e-6); the seed's ratio fits every stage.
    if args.min_lr is None:
        args.min_lr = args.lr / 10
    if not 0 <= args.min_lr <= args.lr:
        raise ValueError(f"--min-lr {args.min_lr:g} must be between 0 and --lr {args.lr:g}")
    if args.lr_warmup_iters is not None and args.lr_warmup_fraction is not None:
        raise ValueError("--lr-warmup-iters and --lr-warmup-fraction are mutually exclusive")
    if args.save_interval is not None and not args.save:
        raise ValueError("--save-interval needs --save DIR")
    if args.exit_signal not in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT"):
        raise ValueError(f"--exit-signal {args.exit_signal!r}: use SIGTERM, SIGUSR1, SIGUSR2 or SIGINT")
    if args.exit_duration_in_mins is not None and args.exit_duration_in_mins <= 0:
        raise ValueError("--exit-duration-in-mins must be > 0")
    for flag in ("num_experts", "moe_shared_expert_intermediate_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0")
    if args.moe_router_topk is not None and args.moe_router_topk < 1:
        raise ValueError("--moe-router-topk must be >= 1")
    if args.moe_aux_loss_coeff < 0:
        raise ValueError("--moe-aux-loss-coeff must be >= 0")
    if args.moe_expert_capacity_factor is not None and args.moe_expert_capacity_factor <= 0:
        raise ValueError("--moe-expert-capacity-factor must be > 0")
    if args.save_hf and not args.save:
        raise ValueError("--save-hf needs --save DIR (the HF folder goes into each saved iteration, DIR/iter_N/hf)")
    if args.load_hf and args.load:
        raise ValueError("--load-hf and --load are mutually exclusive: --load-hf starts a run from an HF folder, "
                         "--load resumes (or, with --finetune, starts from) a checkpoint")
    if args.finetune and not (args.load or args.load_hf):
        raise ValueError("--finetune needs --load CHECKPOINT (it starts from that checkpoint's weights)")
    if settings_from_args(args) is not None and not args.load:  # the --lora-* checks; RunContext holds them
        raise ValueError("--lora-rank needs --load CHECKPOINT: the adapters train on that checkpoint's frozen weights "
                         "(a LoRA checkpoint holds only adapters and points at it)")
    args.split = normalize_split(args.split)
    problem = Tracking.from_args(args).problem()  # a missing tracker package: now, before any model is built
    if problem:
        raise ValueError(problem)
    return args


def normalize_split(text: str) -> str:
    """Megatron's --split: up to three non-negative train,valid,test weights (',' or '/'), not all zero."""
    parts = [p.strip() for p in text.replace("/", ",").split(",")]
    if len(parts) > 3 or not all(parts):
        raise ValueError(f"--split {text!r}: give up to three comma-separated weights train,valid,test (e.g. 969,30,1)")
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"--split {text!r}: weights must be numbers (e.g. 969,30,1)") from None
    if any(not w >= 0 or w == float("inf") for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--split {text!r}: weights must be finite, non-negative and not all zero")
    return ",".join(parts)
