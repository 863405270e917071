"""The generic training loop: every stage (pretrain, SFT, reward, DPO) is a `Stage` handed to `train()`.

A stage is Megatron-LM's trio — a model (the one assembly, `model.build.build_chunks`, with the stage's head), a
forward step returning (output, loss function), and a datasets provider — plus its own flags. The loop derives a typed
`RunContext` (training/context.py) from the flags once and hands it to the stage's datasets provider, forward step
and hooks; it writes nothing back into the parsed flags. The loop owns everything else: runtime init, model chunks (virtual pipeline), mixed
precision, megatron DDP, optimizer (distributed or not), LR schedule, megatron's pipeline schedules, gradient
accumulation, evaluation, NaN/inf skipping, logging (loss, lr, grad norm, tokens/s, MFU) and checkpoints.

Loss convention: a stage's loss function returns (loss_sum, count, {"name": tensor([sum, count]), ...}) and the
config sets `calculate_per_token_loss`, so megatron divides gradients by the global count across micro-batches and
DP ranks. The update is then an exact mean over the global batch whatever its split into micro-batches and
DP ranks (pretrain/SFT count tokens, DPO/reward count pairs).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from functools import partial
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from tinyllm_mcore.model import lora
from tinyllm_mcore.model.build import transformer_config
from tinyllm_mcore.model.presets import ModelPreset, get_preset
from tinyllm_mcore.runtime import distributed as rt
from tinyllm_mcore.checkpoint import adapters
from tinyllm_mcore.checkpoint import io as ckpt
from tinyllm_mcore.convert import in_training as hf_io
from tinyllm_mcore.training.arguments import build_parser, validate
from tinyllm_mcore.training.context import BatchPlan, ParallelLayout, RunContext
from tinyllm_mcore.training.exit_conditions import ExitConditions
from tinyllm_mcore.training.metrics import Tracking, peak_tflops


@dataclass
class StepData:
    """What a stage's `prepare_step` hands the loop for one iteration (GRPO: the step's rollouts)."""
    micro_batches: list[dict]  # this rank's micro-batches of the step, in order
    metrics: dict[str, float]  # logged with the step's losses (the same on every rank)
    train: bool = True  # False: no update this step (e.g. no sample carries a learning signal); data consumed


@dataclass
class Stage:
    name: str
    # (ctx) -> (train, valid, test) datasets yielding dict samples (None with prepare_step)
    datasets_provider: Callable | None
    # (ctx, data_iterator, model) -> (output_tensor, loss_fn)
    forward_step: Callable
    # which head build_model puts on the trunk: "lm" or "reward"
    model_head: str = "lm"
    # adds stage-specific flags
    extra_args: Callable[[argparse.ArgumentParser], None] | None = None
    default_warmup_fraction: float = 0.05
    # False: the stage has its own data flags, so --data-path / --mock-data are not required
    needs_data_path: bool = True
    # reshuffle the training set each epoch (finetuning sets are small and read many times)
    shuffle_each_epoch: bool = False
    # rows a sample puts in a batch (2: a chosen/rejected pair)
    sequences_per_sample: int = 1
    # activations of this many models travel in one pipeline message (DPO: the policy's and the reference's);
    # or (args) -> that number
    models_per_pipeline_message: int | Callable = 1
    # (ctx, model) -> None: on each freshly built chunk, before checkpoints load (reward: --init-from's trunk)
    init_weights: Callable | None = None
    # (ctx) -> None: after the checkpoint is loaded (DPO builds its frozen references)
    after_load: Callable | None = None
    # (args) -> None: cheap input checks (paths, files) run before any process group or model is built
    check_args: Callable | None = None
    # names in the loss function's report dict, in order (every rank must know them, not only the last stage);
    # or (args) -> those names
    report_names: tuple[str, ...] | Callable = ("lm loss",)
    # the report logged with its perplexity at validation, if any
    perplexity_of: str | None = None
    # (ctx, iteration, consumed_samples) -> StepData: makes each step's data itself, run before every step (GRPO's
    # rollouts on the current weights); the datasets provider is then not used for training
    prepare_step: Callable | None = None
    # (ctx, iteration) -> {name: value} on every rank: the stage's own validation (GRPO: held-out accuracy), run at
    # --eval-interval in place of the validation split's losses
    evaluate: Callable | None = None


# ---------------------------------------------------------------------------------------------------------------
# Setup


def model_preset(args, tokenizer=None) -> ModelPreset:
    vocab = args.vocab_size or (tokenizer.vocab_size if tokenizer is not None else None)
    return get_preset(args.model_size, vocab_size=vocab, num_experts=getattr(args, "num_experts", None),
                      moe_router_topk=getattr(args, "moe_router_topk", None),
                      moe_shared_expert_ffn_hidden_size=getattr(args, "moe_shared_expert_intermediate_size", None))


def virtual_pipeline_stages(args, preset: ModelPreset) -> int | None:
    """Model chunks per pipeline rank (None without --num-layers-per-virtual-pipeline-stage)."""
    if not args.num_layers_per_virtual_pipeline_stage:
        return None
    return preset.num_layers // args.pipeline_model_parallel_size // args.num_layers_per_virtual_pipeline_stage


def build_config(args, preset: ModelPreset):
    vpp = virtual_pipeline_stages(args, preset)
    config = transformer_config(
        preset,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=args.expert_model_parallel_size,
        # megatron's MoE layer refuses to train under TP without sequence parallelism
        sequence_parallel=args.sequence_parallel or bool(preset.num_experts),
        bf16=args.bf16,
        fp16=args.fp16,
        use_cpu_initialization=not torch.cuda.is_available(),
        init_method_std=args.init_method_std,
        attention_dropout=args.attention_dropout,
        hidden_dropout=args.hidden_dropout,
        recompute=args.recompute_activations,
        moe_aux_loss_coeff=getattr(args, "moe_aux_loss_coeff", 1e-2),
        moe_expert_capacity_factor=getattr(args, "moe_expert_capacity_factor", None),
        calculate_per_token_loss=True,
    )
    return config


def build_model_chunks(stage: Stage, ctx: RunContext, config):
    """This rank's model chunks (model.build.build_chunks, the stage's head and init hook) in megatron DDP."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from tinyllm_mcore.model.build import build_chunks, use_te_for

    args = ctx.args
    use_te = use_te_for(args.transformer_impl)
    if ctx.lora is not None:  # the adapters hook megatron's local linear layers (TE fuses the norm into qkv)
        if use_te:
            raise ValueError("--lora-rank needs --transformer-impl local or auto (the adapters wrap megatron's "
                             "local linear layers)")
        use_te = False
    chunks = build_chunks(ctx.preset, config, head=stage.model_head, seed=args.seed, use_te=use_te, lora=ctx.lora,
                          make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                          init_weights=partial(stage.init_weights, ctx) if stage.init_weights is not None else None)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=args.bf16 or args.fp16,
        overlap_grad_reduce=False,
        use_distributed_optimizer=args.use_distributed_optimizer,
        check_for_nan_in_grad=False,  # the loop skips non-finite iterations itself and reports them
    )
    return [DistributedDataParallel(config, ddp_config, m, disable_bucketing=(i > 0)) for i, m in enumerate(chunks)]


def build_optimizer(args, chunks, config, batch: BatchPlan, default_warmup_fraction: float):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        fp16=args.fp16,
        params_dtype=config.params_dtype,
        loss_scale=args.loss_scale,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, chunks)
    use_fused_adam(optimizer)
    gbs = batch.global_batch_size
    decay_iters = max(args.lr_decay_iters or args.train_iters, 1)
    if args.lr_warmup_iters is not None:
        warmup_iters = args.lr_warmup_iters
    else:
        fraction = args.lr_warmup_fraction if args.lr_warmup_fraction is not None else default_warmup_fraction
        warmup_iters = int(fraction * decay_iters)
    if args.train_iters == 0:  # a run that only initialises (and saves) weights
        warmup_iters = 0
    if warmup_iters >= decay_iters:
        raise ValueError(f"LR warmup ({warmup_iters} iters) must be shorter than the decay ({decay_iters} iters)")
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=warmup_iters * gbs,
        lr_decay_steps=decay_iters * gbs,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters * gbs,
        wd_incr_style="constant",
        wsd_decay_steps=int(0.1 * decay_iters) * gbs if args.lr_decay_style == "WSD" else None,
        lr_wsd_decay_style="linear" if args.lr_decay_style == "WSD" else None,
    )
    return optimizer, scheduler


def torch_adam_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch Adam/AdamW instances inside a megatron optimizer (chained or not); none when TE's or Apex's
    FusedAdam is in use."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    inner = [getattr(part, "optimizer", None) for part in parts]
    return [o for o in inner if isinstance(o, (torch.optim.Adam, torch.optim.AdamW))]


def use_fused_adam(optimizer) -> None:
    """Run torch's fused AdamW kernel where megatron fell back to torch's optimizer (no TE / Apex: every CPU run).

    megatron passes no implementation flag, and off CUDA torch then takes its per-tensor Python loop: at 42m on 2
    CPU threads a step of it took 340 ms against the fused kernel's 32 ms (~15% of the whole training step); it is
    also what transformers' Trainer runs by default (optim="adamw_torch_fused"). Called after each state load too:
    a checkpoint's param groups carry the flag they were saved with."""
    for torch_optimizer in torch_adam_optimizers(optimizer):
        for group in torch_optimizer.param_groups:
            params = group["params"]
            if params and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params):
                group["fused"], group["foreach"] = True, False


# ---------------------------------------------------------------------------------------------------------------
# Data: deterministic micro-batches, resumable from a consumed-sample count


def collate(samples: list[dict]) -> dict:
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in samples[0]}


def _check_ids(dataset, index: int, sample: dict, vocab_size: int | None) -> dict:
    """A cheap guard for data without a vocabulary sidecar: ids outside the model's vocabulary would index past the
    embedding (a traceback at TP1) or silently into its padding rows (at any TP)."""
    if vocab_size is None:
        return sample
    for key in ("tokens", "labels"):
        ids = torch.as_tensor(sample[key]) if key in sample else None
        if ids is None or not ids.numel():
            continue
        low, high = int(ids.min()), int(ids.max())
        if high >= vocab_size or low < -1:  # -1: a label masked out
            bad = high if high >= vocab_size else low
            part = dataset
            if "dataset_id" in sample and hasattr(dataset, "datasets"):  # a blend: name the prefix the sample is from
                part = dataset.datasets[int(sample["dataset_id"])]
            name = getattr(getattr(part, "dataset", None), "path_prefix", None) or type(part).__name__
            raise ValueError(f"{name}: sample {index} has token id {bad}, outside the model's vocabulary of "
                             f"{vocab_size} (data made with another tokenizer?)")
    return sample


def micro_batches(dataset, *, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                  shuffle_seed: int | None = None, vocab_size: int | None = None) -> Iterator[dict]:
    """Global step g takes samples [g·mbs·dp, (g+1)·mbs·dp); DP rank r the r-th micro-batch of those.

    Indices past the dataset's end wrap into a new epoch (reshuffled when `shuffle_seed` is set; megatron's
    GPTDataset is already shuffled and sized for the run, so pretraining never wraps).
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("dataset is empty")
    permutations: dict[int, np.ndarray] = {}

    def index(global_index: int) -> int:
        epoch, i = divmod(global_index, n)
        if shuffle_seed is None:
            return i
        if epoch not in permutations:
            permutations.clear()
            permutations[epoch] = np.random.default_rng(shuffle_seed + epoch).permutation(n)
        return int(permutations[epoch][i])

    start = consumed_samples
    while True:
        first = start + dp_rank * micro_batch_size
        yield collate([_check_ids(dataset, index(first + j), dataset[index(first + j)], vocab_size)
                       for j in range(micro_batch_size)])
        start += micro_batch_size * dp_size


# ---------------------------------------------------------------------------------------------------------------
# Steps


def _reduce_reports(losses_reduced: list[dict]) -> dict[str, float]:
    """Sum each reported [sum, count] over micro-batches and DP ranks; return sum/count per name."""
    from megatron.core import parallel_state as ps

    if not ps.is_pipeline_last_stage(ignore_virtual=True) or not losses_reduced:
        return {}
    names = sorted(losses_reduced[0])
    totals = torch.stack([sum(torch.as_tensor(r[k], dtype=torch.float64).reshape(2) for r in losses_reduced)
                          for k in names])
    if torch.cuda.is_available():
        totals = totals.cuda()
    dist.all_reduce(totals, group=ps.get_data_parallel_group(with_context_parallel=True))
    return {k: (t[0] / t[1].clamp(min=1)).item() for k, t in zip(names, totals.cpu())}


def _broadcast_from_last_stage(values: dict[str, float], names: list[str]) -> dict[str, float]:
    """Make the last stage's reduced numbers known to every rank (all decide together whether to skip)."""
    from megatron.core import parallel_state as ps

    t = torch.tensor([values.get(k, 0.0) for k in names] or [0.0], dtype=torch.float64)
    if torch.cuda.is_available():
        t = t.cuda()
    src = ps.get_pipeline_model_parallel_last_rank()
    dist.broadcast(t, src, group=ps.get_pipeline_model_parallel_group())
    return dict(zip(names, t.cpu().tolist()))


def _run_schedule(stage: Stage, ctx: RunContext, forward_backward, data_iters, forward_only: bool) -> list[dict]:
    """One global batch through megatron's pipeline schedule (all micro-batches, every virtual chunk)."""
    chunks, batch = ctx.chunks, ctx.batch
    return forward_backward(
        forward_step_func=partial(stage.forward_step, ctx),
        data_iterator=data_iters if len(chunks) > 1 else data_iters[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=batch.num_microbatches,
        seq_length=batch.seq_length,
        micro_batch_size=batch.micro_batch_size * batch.sequences_per_message,  # pipeline message rows
        decoder_seq_length=batch.seq_length,
        forward_only=forward_only,
    )


def train_step(stage: Stage, ctx: RunContext, forward_backward, data_iters, optimizer, scheduler):
    for m in ctx.chunks:
        m.zero_grad_buffer()
    optimizer.zero_grad()
    reports = _reduce_reports(_run_schedule(stage, ctx, forward_backward, data_iters, forward_only=False))
    reports = _broadcast_from_last_stage(reports, ctx.report_names)
    finite = all(math.isfinite(v) for v in reports.values())
    flag = torch.tensor([0.0 if finite else 1.0], device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() > 0:  # skip the update: the data is consumed, weights, optimizer and LR stay
        return reports, None, False
    update_ok, grad_norm, _ = optimizer.step()
    if update_ok:
        scheduler.step(increment=ctx.batch.global_batch_size)
    return reports, grad_norm, update_ok


def evaluate(stage: Stage, ctx: RunContext, forward_backward, valid_iters_factory) -> dict[str, float]:
    for m in ctx.chunks:
        m.eval()
    iters = valid_iters_factory()
    totals: dict[str, list[float]] = {}
    with torch.no_grad():
        for _ in range(ctx.args.eval_iters):
            losses = _run_schedule(stage, ctx, forward_backward, iters, forward_only=True)
            for k, v in _reduce_reports(losses).items():
                totals.setdefault(k, []).append(v)
    for m in ctx.chunks:
        m.train()
    result = {k: float(np.mean(v)) for k, v in totals.items()}
    return _broadcast_from_last_stage(result, ctx.report_names)


# ---------------------------------------------------------------------------------------------------------------
# The loop


def parse_args(stage: Stage, argv=None) -> argparse.Namespace:
    parser = build_parser(f"tinyllm-mcore {stage.name}", stage.extra_args)
    return validate(parser.parse_args(argv), needs_data_path=stage.needs_data_path)


@dataclass
class TrainingRun:
    """What setup() builds for the loop: the context (with the model chunks), optimizer, schedule, start point."""
    ctx: RunContext
    config: object  # megatron TransformerConfig
    optimizer: object
    scheduler: object
    iteration: int
    consumed_samples: int


def run_context(stage: Stage, args, tokenizer=None) -> RunContext:
    """Derive the run's preset, layout and batch arithmetic from the flags, checking what needs no process group."""
    preset = model_preset(args, tokenizer)
    launch = rt.launch_from_env()
    dp = rt.check_parallel_layout(
        launch.world_size, args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
        preset.num_attention_heads, preset.num_layers, args.num_layers_per_virtual_pipeline_stage,
        args.expert_model_parallel_size, preset.kv_heads, preset.num_experts)
    global_batch = args.global_batch_size or args.micro_batch_size * dp
    if global_batch % (args.micro_batch_size * dp):
        raise rt.ParallelConfigError(
            f"global batch {global_batch} is not divisible by micro-batch {args.micro_batch_size} x "
            f"data-parallel {dp}")
    if args.seq_length > preset.max_position_embeddings:
        raise ValueError(f"--seq-length {args.seq_length} exceeds the {preset.name} preset's "
                         f"max position embeddings {preset.max_position_embeddings}")
    copies = stage.models_per_pipeline_message
    copies = copies(args) if callable(copies) else copies
    pipeline_copies = copies if args.pipeline_model_parallel_size > 1 else 1
    report_names = stage.report_names(args) if callable(stage.report_names) else stage.report_names
    batch = BatchPlan(seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
                      global_batch_size=global_batch, num_microbatches=global_batch // (args.micro_batch_size * dp),
                      sequences_per_sample=stage.sequences_per_sample,
                      sequences_per_message=stage.sequences_per_sample * pipeline_copies)
    layout = ParallelLayout(tensor=args.tensor_model_parallel_size, pipeline=args.pipeline_model_parallel_size,
                            virtual_pipeline=virtual_pipeline_stages(args, preset),
                            expert=args.expert_model_parallel_size, data=dp, data_rank=0)
    return RunContext(stage_name=stage.name, args=args, preset=preset, tokenizer=tokenizer, layout=layout,
                      batch=batch, report_names=tuple(report_names), model_head=stage.model_head,
                      lora=lora.settings_from_args(args))


def setup(stage: Stage, args, tokenizer=None, cleanup: contextlib.ExitStack | None = None) -> TrainingRun:
    """Runtime, model chunks, optimizer, scheduler, checkpoint: everything the loop uses. The --save folder's lock
    is released by `cleanup` (train's), else when the process ends."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.utils import get_model_config

    if stage.check_args is not None:
        stage.check_args(args)
    ctx = run_context(stage, args, tokenizer)
    hf_io.check_flags(ctx)
    # --load is resolved once, here (fail fast, before building anything), and its common state read once below
    load_path = ckpt.resolve_load_dir(args.load) if args.load else None

    layout = ctx.layout
    rt.initialize(layout.tensor, layout.pipeline, layout.virtual_pipeline, layout.expert, seed=args.seed)
    ctx.layout = dataclasses.replace(layout, data_rank=ps.get_data_parallel_rank())
    if args.save:
        save_lock = _claim_save_folder(args.save)
        if save_lock is not None and cleanup is not None:
            cleanup.callback(save_lock.release)
    loaded, lora_base = None, None
    if load_path is not None:  # the files first (checksums), then what they hold (model shape, tokenizer)
        loaded = ckpt.read_checkpoint(load_path, verify=not args.no_verify_checkpoint,
                                      require_manifest=args.require_manifest)
        ckpt.check_matches_run(loaded, ctx.preset, ctx.tokenizer_identity, args.allow_tokenizer_change)
        if adapters.is_lora_checkpoint(loaded):  # adapters only: its base first (the one they were trained on)
            _check_lora_settings(ctx, loaded)
            lora_base = adapters.open_base(loaded, verify=not args.no_verify_checkpoint,
                                           require_manifest=args.require_manifest)
        if ctx.lora is not None:
            ctx.lora_base = adapters.base_record(loaded)
    hf_start = hf_io.open_hf_start(ctx) if args.load_hf else None  # the same order for an HF folder
    config = build_config(args, ctx.preset)
    ctx.chunks = build_model_chunks(stage, ctx, config)
    optimizer, scheduler = build_optimizer(args, ctx.chunks, config, ctx.batch, stage.default_warmup_fraction)

    model_config = get_model_config(ctx.chunks[0])
    model_config.grad_scale_func = optimizer.scale_loss
    model_config.finalize_model_grads_func = finalize_model_grads

    iteration, consumed = 0, 0
    if loaded is not None:
        load_flags = dict(load_optim=not (args.no_load_optim or args.skip_train), load_rng=not args.no_load_rng)
        if lora_base is not None:
            iteration, consumed = adapters.load(loaded, lora_base, ctx.chunks, optimizer, scheduler,
                                                finetune=args.finetune, **load_flags)
        else:
            # a LoRA run from a full checkpoint (its base): the base weights only, adapters fresh, counting from zero
            from_base = ctx.lora is not None
            if from_base and not args.finetune:
                rt.print_rank0(f"{args.load} holds no LoRA adapters: its weights are the frozen base, the adapters "
                               "start fresh (as with --finetune)")
            iteration, consumed = ckpt.load_checkpoint(loaded, ctx.chunks, optimizer, scheduler,
                                                       finetune=args.finetune or from_base,
                                                       skip_key=lora.is_adapter_key if from_base else None,
                                                       **load_flags)
        use_fused_adam(optimizer)
        rt.print_rank0(f"loaded {args.load} at iteration {iteration} ({consumed} samples consumed)")
    if hf_start is not None:
        hf_io.load_hf_start(hf_start, ctx, optimizer)
    if stage.after_load is not None:
        stage.after_load(ctx)
    return TrainingRun(ctx=ctx, config=config, optimizer=optimizer, scheduler=scheduler, iteration=iteration,
                       consumed_samples=consumed)


def _check_lora_settings(ctx: RunContext, loaded) -> None:
    """A LoRA checkpoint continues with the adapters it holds: the run's --lora-* must be its settings."""
    saved = adapters.settings_of(loaded)
    flags = (f"--lora-rank {saved.rank} --lora-alpha {saved.alpha:g} --lora-dropout {saved.dropout:g} "
             f"--lora-target {','.join(saved.targets)}")
    if ctx.lora is None:
        raise ValueError(f"{loaded.path} is a LoRA checkpoint (adapters on {loaded.metadata.lora_base['path']}): "
                         f"continue it with its settings, {flags}")
    if (ctx.lora.rank, ctx.lora.alpha, ctx.lora.targets) != (saved.rank, saved.alpha, saved.targets):
        raise ValueError(f"--lora-*: {loaded.path} holds adapters trained with {flags}; pass those")


def _claim_save_folder(save: str):
    """Rank 0 locks --save for this run and clears saves that died midway; every rank fails alike if it is taken."""
    from tinyllm_mcore.checkpoint import safety as safety

    def claim():
        lock = safety.SaveFolderLock(save)
        for removed in safety.remove_incomplete(Path(save)):
            print(f"removed {removed}: an incomplete checkpoint (a save that did not finish)", flush=True)
        return lock

    return rt.on_rank0_then_share(claim, share_value=False)  # the lock is rank 0's


def train(stage: Stage, args, tokenizer=None) -> dict:
    """Run a stage to --train-iters. Returns the history (train/eval records) on every rank.

    However it ends (an error included), the signal handler is restored, the --save lock released and the metrics
    writer closed, so an in-process caller can run again."""
    with contextlib.ExitStack() as cleanup:
        # first: a signal that arrives while the model is built is remembered too (Slurm may warn right at the start)
        exit_conditions = ExitConditions.from_args(args)
        cleanup.callback(exit_conditions.close)
        return _train(stage, args, tokenizer, exit_conditions, cleanup)


def _train(stage: Stage, args, tokenizer, exit_conditions: ExitConditions, cleanup: contextlib.ExitStack) -> dict:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from tinyllm_mcore.model.gpt import flops_per_token
    from tinyllm_mcore.training.moe_metrics import MoEMetrics

    run = setup(stage, args, tokenizer, cleanup)
    ctx, optimizer, scheduler = run.ctx, run.optimizer, run.scheduler
    chunks, batch, preset = ctx.chunks, ctx.batch, ctx.preset
    train_ds, valid_ds = None, None
    if stage.datasets_provider is not None:
        train_ds, valid_ds, _ = stage.datasets_provider(ctx)

    def iterators(dataset, consumed, shuffle):
        seed = args.seed if shuffle else None
        return [micro_batches(dataset, consumed_samples=consumed, micro_batch_size=batch.micro_batch_size,
                              dp_rank=ctx.layout.data_rank, dp_size=ctx.layout.data, shuffle_seed=seed,
                              vocab_size=preset.vocab_size)
                for _ in chunks]  # one per virtual-pipeline chunk: each chunk draws the same micro-batches

    train_iters = iterators(train_ds, run.consumed_samples, stage.shuffle_each_epoch) if train_ds is not None else None
    valid_factory = (lambda: iterators(valid_ds, 0, False)) if valid_ds is not None and len(valid_ds) else None
    if stage.evaluate is not None:
        run_evaluation = partial(stage.evaluate, ctx)
    else:
        run_evaluation = (lambda at: evaluate(stage, ctx, forward_backward, valid_factory)) if valid_factory else None
    if run_evaluation is None and args.eval_interval and not args.skip_train:
        raise ValueError(f"--eval-interval {args.eval_interval} asks for validation, but --split {args.split} "
                         "leaves no validation data: give the split a validation share or drop --eval-interval")
    forward_backward = get_forward_backward_func()
    moe_metrics = MoEMetrics.attach(chunks, run.config)  # None for dense models

    # The logging rank opens the sinks; a tracker that fails to start (a server out of reach) stops every rank alike.
    tracking, config = Tracking.from_args(args), ctx.checkpoint_metadata().to_dict()
    writer = rt.on_rank_then_share(lambda: tracking.open(config), rt.logging_rank(), share_value=False)
    if writer is not None:  # closed however the run ends; trackers record a failed run as failed
        cleanup.push(lambda exc_type, exc, tb: writer.close(failed=exc_type is not None))
    flops_token = flops_per_token(preset, batch.seq_length)
    peak = None
    world = dist.get_world_size()

    iteration, consumed = run.iteration, run.consumed_samples
    last_saved = iteration if args.load and not args.finetune else None
    history: list[dict] = []
    skipped_total, window = 0, {"records": [], "time": 0.0, "skipped": 0}
    rt.print_rank0(f"[{stage.name}] {preset.name}: {preset.num_parameters():,} params, TP={ctx.layout.tensor} "
                   f"PP={ctx.layout.pipeline} DP={ctx.layout.data}, global batch {batch.global_batch_size}"
                   f" = {batch.micro_batch_size} x {ctx.layout.data} x {batch.num_microbatches} micro-batches")

    def save(at: int) -> None:
        path = ckpt.save_checkpoint(
            args.save, at, chunks, optimizer, scheduler, consumed_samples=consumed, metadata=ctx.checkpoint_metadata(),
            dist_ckpt_optim_fully_reshardable=args.dist_ckpt_optim_fully_reshardable,
            distrib_optim_fully_reshardable_mem_efficient=args.distrib_optim_fully_reshardable_mem_efficient,
            export=partial(hf_io.save_hf_folder, ctx) if args.save_hf else None,
            model_keys=lora.is_adapter_key if ctx.lora is not None else None)  # LoRA: the adapters; base: lora_base
        rt.print_rank0(f"saved checkpoint {path}")

    if args.skip_train:
        if run_evaluation is None:
            raise ValueError("--skip-train evaluates the validation split, but it is empty")
        result = run_evaluation(iteration)
        history.append({"split": "valid", "iteration": iteration, **result})
        rt.print_rank0(f"[{stage.name}] evaluation of iteration {iteration}: " +
                       " | ".join(f"{k} {v:.6f}" for k, v in result.items()))
        return {"history": history, "iteration": iteration, "consumed_samples": consumed, "chunks": chunks,
                "skipped": 0}
    while iteration < args.train_iters:
        t0 = time.perf_counter()
        step_metrics, update = {}, True
        if stage.prepare_step is not None:
            step = stage.prepare_step(ctx, iteration, consumed)
            step_metrics, update = step.metrics, step.train
            train_iters = [iter(step.micro_batches) for _ in chunks]
        t1 = time.perf_counter()
        if update:
            reports, grad_norm, ok = train_step(stage, ctx, forward_backward, train_iters, optimizer, scheduler)
        else:  # nothing to learn from: weights, optimizer and LR stay; the data is consumed
            reports, grad_norm, ok = {}, None, True
            rt.print_rank0(f"iteration {iteration + 1}: no sample carries a learning signal; update skipped")
        dt = time.perf_counter() - t1
        window["prepare"] = window.get("prepare", 0.0) + (t1 - t0)
        iteration += 1
        consumed += batch.global_batch_size
        if not ok:
            skipped_total += 1
            window["skipped"] += 1
            rt.print_rank0(f"iteration {iteration}: non-finite loss {reports}; update skipped "
                           f"({skipped_total}/{args.max_skipped_iters})")
            if skipped_total >= args.max_skipped_iters:
                raise FloatingPointError(f"aborting: {skipped_total} iterations had a non-finite loss")
        window["time"] += dt
        measured = {**reports, **step_metrics,
                    **(moe_metrics.step(batch.num_microbatches) if moe_metrics is not None else {})}
        record = {"iteration": iteration, **measured, "lr": scheduler.get_lr(optimizer.param_groups[0]),
                  "grad_norm": float(grad_norm) if grad_norm is not None else float("nan")}
        history.append({"split": "train", **record})
        window["records"].append(measured)
        if grad_norm is not None:
            window["grad_norm"] = float(grad_norm)
        if iteration % args.log_interval == 0 or iteration == args.train_iters:
            if peak is None:
                peak = peak_tflops(run.config.params_dtype, args.peak_tflops)
            iters = len(window["records"])
            # the trained tokens over the training time (a prepare_step's own time, e.g. rollouts, is not in it)
            tokens_per_s = batch.tokens_per_iteration * iters / window["time"]
            mfu = tokens_per_s * flops_token / (peak * 1e12 * world)
            # every metric of the window's steps (a step that made no update reports no loss), and the grad norm
            # of its last update (NaN only when no step of the window updated)
            keys = dict.fromkeys(k for r in sorted(window["records"], key=len, reverse=True) for k in r)
            log = {k: float(np.mean([r[k] for r in window["records"] if k in r])) for k in keys}
            log.update({"lr": record["lr"], "grad_norm": window.get("grad_norm", float("nan")),
                        "tokens_per_s": tokens_per_s,
                        "mfu": mfu, "skipped": window["skipped"]})
            parts = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in log.items())
            step_ms = 1000 * (window["time"] + window.get("prepare", 0.0)) / iters
            rt.print_rank0(f"[{stage.name}] iter {iteration}/{args.train_iters} | {parts} | {step_ms:.0f} ms/iter")
            if writer is not None:
                writer.write(iteration, log)
            window = {"records": [], "time": 0.0, "skipped": 0}
        if run_evaluation and args.eval_interval and (iteration % args.eval_interval == 0 or iteration == args.train_iters):
            result = run_evaluation(iteration)
            history.append({"split": "valid", "iteration": iteration, **result})
            ppl = stage.perplexity_of
            rt.print_rank0(f"[{stage.name}] validation at iter {iteration}: " +
                           " | ".join(f"{k} {v:.4f}" for k, v in result.items()) +
                           (f" | ppl {math.exp(min(result[ppl], 50)):.2f}" if ppl in result else ""))
            if writer is not None:
                writer.write(iteration, result, prefix="valid")
        stop = "--exit-interval reached" if args.exit_interval is not None and iteration >= args.exit_interval \
            else exit_conditions.check()
        if args.save and ((args.save_interval and iteration % args.save_interval == 0) or stop):
            save(iteration)
            last_saved = iteration
        if stop:
            rt.print_rank0(f"[{stage.name}] exiting at iteration {iteration}: {stop}")
            break
    trained = iteration - run.iteration
    if trained and skipped_total == trained:
        raise FloatingPointError(f"every one of the {trained} iterations had a non-finite loss; nothing was trained")
    if args.save and last_saved != iteration:  # always leave the final state (also a --train-iters 0 init)
        save(iteration)
    return {"history": history, "iteration": iteration, "consumed_samples": consumed, "chunks": chunks,
            "optimizer": optimizer, "scheduler": scheduler, "skipped": skipped_total}


def run_stage(stage: Stage, argv=None) -> int:
    """A stage's CLI: parse, load the tokenizer, train; bad input is one `error:` line and a non-zero exit."""
    from tinyllm_mcore.cli.errors import run_cli
    from tinyllm_mcore.training.batches import load_tokenizer

    def run():
        args = parse_args(stage, argv)
        tokenizer = load_tokenizer(args)
        try:
            train(stage, args, tokenizer)
        finally:  # also on bad input found after init: leave no process group behind for in-process callers
            if dist.is_initialized():
                rt.destroy()

    return run_cli(run)
