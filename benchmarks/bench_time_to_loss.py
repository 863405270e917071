"""Time to loss on real text: tinyllm-mcore's training loop vs transformers' Qwen2ForCausalLM + Trainer, one process.

Both sides train the same model from the same initial weights on the same token windows in the same order, with
the same optimizer and schedule, and are evaluated at the same steps on the same held-out documents:

- Data: zh_classics.jsonl.gz read with the project's corpus reader (data/corpus.py), tokenized with the ChatGLM3
  tokenizer (Tokenizer.load), each document followed by eod, concatenated and cut into windows of seq + 1 tokens
  (consecutive windows share one token, as megatron's GPTDataset). Every --valid-every-th document is held out for
  validation (never trained on by either side); the others, in corpus order, are the training stream.
- Ours: the loop's own setup / train_step / evaluate (training/loop.py), megatron optimizer and
  OptimizerParamScheduler (cosine, warmup, min-lr = lr / 10), in --ours-precision (bf16: bf16 params, fp32 main
  weights and grads).
- HF: Qwen2ForCausalLM (SDPA attention) in transformers' Trainer: sequential sampler (the same order as ours),
  lr_scheduler_type cosine_with_min_lr with min_lr = lr / 10 and the same warmup steps (the same LR at every step:
  checked, printed), AdamW (Trainer's default fused torch kernel) with the same betas, eps, weight decay (none on
  biases and norms on both sides: checked) and clip 1.0. Its best CPU setting: --hf-precision auto times a few steps
  of HF's model under fp32 and under bf16 autocast here and picks the faster (both rates printed); 0 dataloader
  workers, because the windows are already token tensors in memory (collating is microseconds) and a worker process
  would only take a core from the --threads compute threads.
- Same initial weights: ours' freshly initialised model goes through the converter's own table
  (convert.mapping.mapping_table / megatron_to_hf, what tinyllm-mcore-to-hf writes; o_proj without bias, so the names
  are exactly Qwen2's) into Qwen2ForCausalLM.load_state_dict(strict=True); the step-0 validation losses and the
  first step's training losses of both sides are printed with their difference. That difference is the softmax
  mass of ours' padded vocab rows (64798 -> 64896; megatron includes them in the loss, the export drops them):
  with those rows added to HF's head, the fp32 step-0 losses agree to 1e-6.

Time is training time only, from the first step, evaluation excluded on both sides (ours: the train_step calls, data
included; HF: the Trainer's loop since on_train_begin minus its evaluate calls). Per size it prints both validation
curves side by side (tokens, loss, seconds) and ends with one line per size:

    time-to-loss {size}: ours {s}s hf {s}s ratio {r}x; max loss gap at equal tokens {p}%

where hf is HF's training time to its final evaluation, ours is the time ours needs to reach HF's final validation
loss (linear between ours' evaluation points; ">T" when it never does, T = its whole run), ratio = hf / ours, and the
gap is max |ours - hf| / hf over the evaluation points (equal tokens on both sides). --plot writes a PNG.

    python benchmarks/bench_time_to_loss.py --sizes 16m 42m --steps 600 --seq-length 512 --micro-batch-size 4 \\
        --eval-interval 50 --threads 2 --plot docs/time_to_loss.png
    python benchmarks/bench_time_to_loss.py --sizes 16m --steps 30 --seq-length 128 --eval-interval 10  # quick
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TINYLLM_SHARED", REPO.parent / "shared")) / "data"
# one table for both sides (the project's defaults, the seed's settings)
OPTIM = dict(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.01, clip=1.0)


# ------------------------------------------------------------------------------------------------------------ data
@dataclass
class Windows:
    """Token windows [n, seq + 1] of one split and the documents they came from."""
    windows: torch.Tensor
    documents: int


def token_windows(corpus: Path, tokenizer, seq: int, train_windows: int, valid_windows: int,
                  valid_every: int) -> tuple[Windows, Windows]:
    """The training stream (documents in corpus order, every valid_every-th held out) and the held-out stream, each
    cut into windows of seq + 1 tokens that overlap by one."""
    from tinyllm_mcore.data.corpus import expand_inputs, iter_texts

    need = {"train": train_windows * seq + 1, "valid": valid_windows * seq + 1}
    streams: dict[str, list[int]] = {"train": [], "valid": []}
    documents = {"train": 0, "valid": 0}
    batch: list[str] = []
    texts = iter_texts(expand_inputs(corpus))
    index = 0

    def take(texts_batch, first_index):
        for offset, ids in enumerate(tokenizer.tokenize_batch(texts_batch)):
            split = "valid" if (first_index + offset) % valid_every == valid_every - 1 else "train"
            if len(streams[split]) < need[split]:
                streams[split] += ids + [tokenizer.eod]
                documents[split] += 1

    for text in texts:
        batch.append(text)
        if len(batch) == 256:
            take(batch, index)
            index += len(batch)
            batch = []
            if all(len(streams[s]) >= need[s] for s in need):
                break
    else:
        take(batch, index)
    for split in need:
        if len(streams[split]) < need[split]:
            raise ValueError(f"{corpus}: too little text for {split} ({len(streams[split])} tokens, "
                             f"{need[split]} needed): lower --steps, --seq-length or --valid-samples")

    def cut(split, n):
        stream = torch.tensor(streams[split][:need[split]], dtype=torch.long)
        return Windows(stream.unfold(0, seq + 1, seq)[:n].contiguous(), documents[split])

    return cut("train", train_windows), cut("valid", valid_windows)


class OursSamples(torch.utils.data.Dataset):
    """The loop's LM sample format (lm_forward_step): tokens, labels, loss_mask, position_ids."""

    def __init__(self, windows: torch.Tensor):
        self.windows = windows
        self.positions = torch.arange(windows.shape[1] - 1)
        self.mask = torch.ones(windows.shape[1] - 1)

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        w = self.windows[i]
        return {"tokens": w[:-1], "labels": w[1:], "loss_mask": self.mask, "position_ids": self.positions}


class HFSamples(torch.utils.data.Dataset):
    """The same windows for transformers: shift_labels are the next tokens (the loss then runs over the same seq
    positions as ours; ``labels`` only switches the loss on)."""

    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        w = self.windows[i]
        return {"input_ids": w[:-1], "labels": w[1:], "shift_labels": w[1:]}


# ----------------------------------------------------------------------------------------------------------- curves
@dataclass
class Curve:
    """Validation losses at evaluation points (step, training seconds so far, loss) and each step's loss and LR."""
    precision: str
    points: list[tuple[int, float, float]] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)
    step_lrs: list[float] = field(default_factory=list)


def time_to_reach(curve: Curve, target: float) -> float | None:
    """Training seconds at which the validation loss first reaches target, linear between evaluation points."""
    previous = None
    for step, seconds, loss in curve.points:
        if loss <= target:
            if previous is None:
                return seconds
            s0, l0 = previous
            return s0 + (l0 - target) / (l0 - loss) * (seconds - s0)
        previous = (seconds, loss)
    return None


# ------------------------------------------------------------------------------------------------------------- ours
def run_ours(size: str, opts, tokenizer, train: Windows, valid: Windows) -> tuple[Curve, dict]:
    """Train with the project's loop; return its curve and its initial weights as Qwen2 tensors."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from tinyllm_mcore.runtime import distributed as rt
    from tinyllm_mcore.training.batches import lm_forward_step
    from tinyllm_mcore.training.loop import Stage, evaluate, micro_batches, parse_args, setup, train_step

    stage = Stage("time-to-loss", None, lm_forward_step, needs_data_path=False)
    mbs = opts.micro_batch_size
    argv = ["--model-size", size, "--seq-length", str(opts.seq_length), "--micro-batch-size", str(mbs),
            "--train-iters", str(opts.steps), "--lr", str(opts.lr), "--min-lr", str(opts.lr / 10),
            "--lr-decay-style", "cosine", "--lr-warmup-iters", str(opts.warmup_steps),
            "--adam-beta1", str(OPTIM["beta1"]), "--adam-beta2", str(OPTIM["beta2"]), "--adam-eps", str(OPTIM["eps"]),
            "--weight-decay", str(OPTIM["weight_decay"]), "--clip-grad", str(OPTIM["clip"]),
            "--eval-iters", str(len(valid.windows) // mbs), "--seed", str(opts.seed)]
    if opts.ours_precision == "bf16":
        argv.append("--bf16")
    try:
        run = setup(stage, parse_args(stage, argv), tokenizer)
        ctx, optimizer, scheduler = run.ctx, run.optimizer, run.scheduler
        initial = export_initial_weights(ctx)
        layout = ctx.layout
        vocab = ctx.preset.vocab_size

        def batches(windows):
            return [micro_batches(OursSamples(windows), consumed_samples=0, micro_batch_size=mbs,
                                  dp_rank=layout.data_rank, dp_size=layout.data, vocab_size=vocab)]

        forward_backward = get_forward_backward_func()
        curve = Curve(opts.ours_precision)

        def validate(step, seconds):
            curve.points.append((step, seconds, evaluate(stage, ctx, forward_backward,
                                                         lambda: batches(valid.windows))["lm loss"]))

        validate(0, 0.0)
        train_iters, trained = batches(train.windows), 0.0
        for step in range(1, opts.steps + 1):
            curve.step_lrs.append(optimizer.param_groups[0]["lr"])
            t0 = time.perf_counter()
            reports, _, ok = train_step(stage, ctx, forward_backward, train_iters, optimizer, scheduler)
            trained += time.perf_counter() - t0
            if not ok:
                raise FloatingPointError(f"ours {size}: step {step} had a non-finite loss {reports}")
            curve.step_losses.append(reports["lm loss"])
            if step % opts.eval_interval == 0 or step == opts.steps:
                validate(step, trained)
        return curve, initial
    finally:  # no process group left behind: HF's Trainer runs as a plain process, as its users run it
        rt.destroy()


def export_initial_weights(ctx) -> dict[str, torch.Tensor]:
    """Ours' current weights as HF Qwen2 tensors, through the converter's table (fp32; bf16 params exactly as the
    optimizer's fp32 main copies hold them)."""
    from tinyllm_mcore.checkpoint.io import unwrap
    from tinyllm_mcore.convert.mapping import MC_EMBED, check_finite, mapping_table, megatron_to_hf

    state = {k: v.detach().float().clone() for k, v in unwrap(ctx.chunks[0]).state_dict().items()
             if not k.endswith("._extra_state")}
    table = mapping_table(ctx.preset, state[MC_EMBED].shape[0], o_proj_bias=False)
    return {name: check_finite(name, t, f"from {source}").clone()
            for name, t, source in megatron_to_hf(table, state.__getitem__, dtype=torch.float32)}


# --------------------------------------------------------------------------------------------------------------- HF
def hf_model(preset, weights: dict[str, torch.Tensor]):
    """Qwen2ForCausalLM of the preset holding exactly ``weights`` (every tensor, nothing else)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tinyllm_mcore.convert.hf_config import hf_config

    config = Qwen2Config.from_dict(hf_config(preset, "qwen2"))
    config._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(config).float()
    expected = set(model.state_dict())
    if set(weights) != expected:
        raise RuntimeError(f"export/Qwen2 tensor names differ: only in the export {sorted(set(weights) - expected)}, "
                           f"only in Qwen2 {sorted(expected - set(weights))}")
    model.load_state_dict(weights, strict=True)
    return model


def probe_hf_precisions(preset, weights, batch: dict, steps: int) -> dict[str, float]:
    """tokens/s of HF's model under fp32 and under bf16 autocast: forward, backward, clip, fused AdamW, like the
    Trainer's step, on throwaway copies (the run itself starts from ``weights`` again). The two alternate step by
    step and each keeps its fastest step, so load from other processes hits both alike."""
    tokens = batch["input_ids"].numel()
    runs = {}
    for precision in ("fp32", "bf16"):
        model = hf_model(preset, weights).train()
        runs[precision] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True))

    def step(precision):
        model, opt = runs[precision]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    best = {precision: math.inf for precision in runs}
    for repeat in range(steps + 1):  # the first round warms up
        for precision in runs:
            t0 = time.perf_counter()
            step(precision)
            if repeat:
                best[precision] = min(best[precision], time.perf_counter() - t0)
    return {precision: tokens / seconds for precision, seconds in best.items()}


def run_hf(preset, weights, opts, precision: str, train: Windows, valid: Windows) -> Curve:
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator
    from transformers.trainer_callback import PrinterCallback

    curve = Curve(precision)
    mbs, train_windows = opts.micro_batch_size, train.windows

    class TimedTrainer(Trainer):
        """Records each step's loss and LR, the validation points and the evaluation time (excluded)."""
        train_start: float | None = None
        eval_seconds = 0.0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                step = len(curve.step_losses)
                if not torch.equal(inputs["input_ids"], train_windows[step * mbs:(step + 1) * mbs, :-1]):
                    raise RuntimeError(f"HF step {step + 1} got other windows than ours (sampler not sequential?)")
                curve.step_losses.append((out[0] if return_outputs else out).item())
                curve.step_lrs.append(self.optimizer.param_groups[0]["lr"])
            return out

        def evaluate(self, *args, **kwargs):
            t0 = time.perf_counter()
            trained = 0.0 if self.train_start is None else t0 - self.train_start - self.eval_seconds
            metrics = super().evaluate(*args, **kwargs)
            self.eval_seconds += time.perf_counter() - t0
            curve.points.append((self.state.global_step, trained, metrics["eval_loss"]))
            return metrics

    class Clock(TrainerCallback):
        def __init__(self):
            self.trainer = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.trainer.train_start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == state.max_steps:  # the last step is evaluated on both sides
                control.should_evaluate = True

    with tempfile.TemporaryDirectory(prefix="ttl-hf-") as out:
        args = TrainingArguments(
            output_dir=out, max_steps=opts.steps, per_device_train_batch_size=mbs, per_device_eval_batch_size=mbs,
            learning_rate=opts.lr, lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr": opts.lr / 10}, warmup_steps=opts.warmup_steps,
            adam_beta1=OPTIM["beta1"], adam_beta2=OPTIM["beta2"], adam_epsilon=OPTIM["eps"],
            weight_decay=OPTIM["weight_decay"], max_grad_norm=OPTIM["clip"], optim="adamw_torch_fused",
            bf16=precision == "bf16", use_cpu=not torch.cuda.is_available(),
            train_sampling_strategy="sequential", dataloader_num_workers=opts.hf_dataloader_workers,
            dataloader_pin_memory=False, dataloader_drop_last=True, remove_unused_columns=False,
            eval_strategy="steps", eval_steps=opts.eval_interval, eval_on_start=True,
            logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
            seed=opts.seed, data_seed=opts.seed)
        clock = Clock()
        trainer = TimedTrainer(model=hf_model(preset, weights), args=args, train_dataset=HFSamples(train_windows),
                               eval_dataset=HFSamples(valid.windows), data_collator=default_data_collator,
                               callbacks=[clock])
        clock.trainer = trainer
        trainer.remove_callback(PrinterCallback)  # its evaluation dicts; the curves are printed at the end
        check_weight_decay_split(trainer)
        torch.set_num_threads(opts.threads)  # as ours, whatever the Trainer's setup did
        trainer.train()
    if len(curve.step_losses) != opts.steps:
        raise RuntimeError(f"HF trained {len(curve.step_losses)} steps, not {opts.steps}")
    return curve


def check_weight_decay_split(trainer) -> None:
    """Megatron decays every parameter except biases and 1-D ones (norms); HF's Trainer must do the same."""
    decayed = set(trainer.get_decay_parameter_names(trainer.model))
    ours_rule = {n for n, p in trainer.model.named_parameters() if not n.endswith(".bias") and p.ndim > 1}
    if decayed != ours_rule:
        raise RuntimeError(f"weight decay differs from megatron's on {sorted(decayed ^ ours_rule)}")


# ---------------------------------------------------------------------------------------------------------- report
def report(size: str, ours: Curve, hf: Curve, tokens_per_step: int, n_weights: int, rates: dict | None,
           preset) -> dict:
    from tinyllm_mcore.model.presets import padded_vocab_size

    probe = ", ".join(f"{k} {v:.0f} tok/s" for k, v in rates.items()) if rates else "given"
    print(f"\n== {size}: ours {ours.precision} (tinyllm-mcore loop) vs HF {hf.precision} (Qwen2ForCausalLM + Trainer; "
          f"HF precision probe: {probe})")
    v0o, v0h = ours.points[0][2], hf.points[0][2]
    l1o, l1h = ours.step_losses[0], hf.step_losses[0]
    print(f"initial weights: {n_weights}/{n_weights} Qwen2 tensors loaded from ours' export (strict)")
    padding = padded_vocab_size(preset.vocab_size, 1) - preset.vocab_size
    print(f"step-0 validation loss: ours {v0o:.6f} hf {v0h:.6f} diff {v0o - v0h:+.2e} ({(v0o - v0h) / v0h:+.2e}); "
          f"ours' softmax also spans its {padding} padded vocab rows (megatron's convention; the export drops "
          f"them): at init that adds about log(1 + {padding}/{preset.vocab_size}) = "
          f"{math.log1p(padding / preset.vocab_size):.2e}, shrinking as training pushes those logits down")
    print(f"first training step loss: ours {l1o:.6f} hf {l1h:.6f} diff {l1o - l1h:+.2e} ({(l1o - l1h) / l1h:+.2e})")
    lr_gap = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ours.step_lrs, hf.step_lrs))
    print(f"learning rates over {len(hf.step_lrs)} steps: max relative difference {lr_gap:.1e}")
    if abs(v0o - v0h) / v0h > 0.01:
        raise RuntimeError(f"{size}: the step-0 validation losses differ by more than 1%: the weights did not "
                           "transfer")
    if [p[0] for p in ours.points] != [p[0] for p in hf.points]:
        raise RuntimeError(f"evaluation steps differ: ours {[p[0] for p in ours.points]}, "
                           f"hf {[p[0] for p in hf.points]}")
    print(f"{'step':>6} {'tokens':>9} | {'ours loss':>9} {'ours s':>8} | {'hf loss':>9} {'hf s':>8} | {'gap':>7}")
    gaps = []
    for (step, os_, ol), (_, hs, hl) in zip(ours.points, hf.points):
        gaps.append(abs(ol - hl) / hl * 100)
        print(f"{step:6d} {step * tokens_per_step:9d} | {ol:9.4f} {os_:8.1f} | {hl:9.4f} {hs:8.1f} | "
              f"{(ol - hl) / hl * 100:+6.2f}%")
    hf_time, target = hf.points[-1][1], hf.points[-1][2]
    reached = time_to_reach(ours, target)
    ours_time = reached if reached is not None else ours.points[-1][1]
    return {"size": size, "ours": ours.__dict__, "hf": hf.__dict__, "tokens_per_step": tokens_per_step,
            "hf_precision_probe": rates, "hf_final_loss": target, "hf_time": hf_time, "ours_time": ours_time,
            "reached": reached is not None, "max_gap_percent": max(gaps)}


def summary_line(r: dict) -> str:
    mark = "" if r["reached"] else ">"
    ratio = r["hf_time"] / r["ours_time"] if r["ours_time"] > 0 else float("inf")
    return (f"time-to-loss {r['size']}: ours {mark}{r['ours_time']:.1f}s hf {r['hf_time']:.1f}s ratio "
            f"{'<' if mark else ''}{ratio:.2f}x; max loss gap at equal tokens {r['max_gap_percent']:.2f}%")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tinyllm_mcore.runtime.files import atomic_write_bytes

    fig, axes = plt.subplots(len(results), 2, figsize=(11, 3.6 * len(results)), squeeze=False)
    for row, r in zip(axes, results):
        for side, colour in (("ours", "tab:blue"), ("hf", "tab:orange")):
            points = r[side]["points"]
            label = f"{'ours' if side == 'ours' else 'HF Trainer'} ({r[side]['precision']})"
            row[0].plot([p[0] * r["tokens_per_step"] for p in points], [p[2] for p in points], "o-", ms=3,
                        color=colour, label=label)
            row[1].plot([p[1] for p in points], [p[2] for p in points], "o-", ms=3, color=colour, label=label)
        row[1].axhline(r["hf_final_loss"], color="grey", ls="--", lw=0.8)
        if r["reached"]:
            row[1].axvline(r["ours_time"], color="tab:blue", ls=":", lw=0.8)
        row[0].set(xlabel="training tokens", ylabel="validation loss",
                   title=f"{r['size']}: max gap {r['max_gap_percent']:.2f}% at equal tokens")
        row[1].set(xlabel="training seconds (evaluation excluded)", ylabel="validation loss",
                   title=f"{r['size']}: HF's final loss: ours {'' if r['reached'] else 'not by '}"
                         f"{r['ours_time']:.0f}s, HF {r['hf_time']:.0f}s")
        for ax in row:
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


# ------------------------------------------------------------------------------------------------------------- main
def parse(argv):
    from tinyllm_mcore.model.presets import PRESETS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["16m", "42m"], choices=[k for k, v in PRESETS.items()
                                                                           if not v.num_experts])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=4, help="also the global batch (no accumulation)")
    p.add_argument("--lr", type=float, default=3e-4, help="peak LR (the seed's); min LR is lr / 10")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of --steps (the loop's default)")
    p.add_argument("--eval-interval", type=int, default=50, help="evaluate every N steps (and at 0 and the end)")
    p.add_argument("--valid-samples", type=int, default=64, help="held-out windows (a multiple of the batch)")
    p.add_argument("--valid-every", type=int, default=50, help="hold out every N-th document")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ours-precision", choices=["bf16", "fp32"], default="bf16",
                   help="bf16 = megatron bf16 params with fp32 main weights (ours' faster CPU setting in "
                        "bench_train where the CPU has bf16 instructions)")
    p.add_argument("--hf-precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: time fp32 and bf16 autocast here and use the faster")
    p.add_argument("--probe-steps", type=int, default=3,
                   help="timed steps per precision for --hf-precision auto (alternating; the fastest counts)")
    p.add_argument("--hf-dataloader-workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--corpus", type=Path, default=SHARED / "zh_classics.jsonl.gz")
    p.add_argument("--tokenizer-model", type=Path, default=SHARED / "tokenizers" / "chatglm3" / "tokenizer.model")
    p.add_argument("--plot", type=Path, default=None, help="write the curves as a PNG (e.g. docs/time_to_loss.png)")
    p.add_argument("--json", type=Path, default=None, help="write the curves and results as JSON")
    opts = p.parse_args(argv)
    for flag in ("steps", "seq_length", "micro_batch_size", "eval_interval", "valid_samples", "valid_every",
                 "threads", "probe_steps"):
        if getattr(opts, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    if opts.hf_dataloader_workers < 0:
        raise ValueError("--hf-dataloader-workers must be >= 0")
    if not opts.lr > 0:
        raise ValueError("--lr must be > 0")
    if opts.warmup_steps is None:
        opts.warmup_steps = int(0.05 * opts.steps)
    if not 0 <= opts.warmup_steps < opts.steps:
        raise ValueError(f"--warmup-steps {opts.warmup_steps} must be between 0 and --steps {opts.steps} - 1")
    if opts.valid_samples % opts.micro_batch_size:
        raise ValueError(f"--valid-samples {opts.valid_samples} must be a multiple of --micro-batch-size "
                         f"{opts.micro_batch_size}")
    for size in opts.sizes:
        if opts.seq_length > PRESETS[size].max_position_embeddings:
            raise ValueError(f"--seq-length {opts.seq_length} exceeds the {size} preset's "
                             f"{PRESETS[size].max_position_embeddings} positions")
    for flag in ("corpus", "tokenizer_model"):
        if not getattr(opts, flag).is_file():
            raise FileNotFoundError(f"--{flag.replace('_', '-')} {getattr(opts, flag)}: no such file")
    for flag in ("plot", "json"):  # checked now, not after an hour of training
        target = getattr(opts, flag)
        if target is not None and not target.parent.is_dir():
            raise FileNotFoundError(f"--{flag} {target}: directory {target.parent} does not exist")
    if opts.plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib (pip install matplotlib)")
    return opts


def main(opts) -> None:
    from tinyllm_mcore.model.presets import get_preset
    from tinyllm_mcore.runtime.files import atomic_write_text
    from tinyllm_mcore.tokenizer.core import Tokenizer

    torch.set_num_threads(opts.threads)
    tokenizer = Tokenizer.load(opts.tokenizer_model)
    t0 = time.perf_counter()
    train, valid = token_windows(opts.corpus, tokenizer, opts.seq_length, opts.steps * opts.micro_batch_size,
                                 opts.valid_samples, opts.valid_every)
    print(f"data: {opts.corpus.name}, {train.documents} training documents -> {len(train.windows)} windows, "
          f"{valid.documents} held-out documents -> {len(valid.windows)} windows of {opts.seq_length} tokens "
          f"({time.perf_counter() - t0:.1f} s); {opts.steps} steps x {opts.micro_batch_size} x {opts.seq_length}, "
          f"lr {opts.lr:g} -> {opts.lr / 10:g} cosine, warmup {opts.warmup_steps}; threads {torch.get_num_threads()}")
    results = []
    for size in opts.sizes:
        preset = get_preset(size, vocab_size=tokenizer.vocab_size)
        ours, weights = run_ours(size, opts, tokenizer, train, valid)
        rates = None
        precision = opts.hf_precision
        if precision == "auto":
            first = HFSamples(train.windows[:opts.micro_batch_size])
            first = {k: torch.stack([first[i][k] for i in range(len(first))]) for k in first[0]}
            rates = probe_hf_precisions(preset, weights, first, opts.probe_steps)
            precision = max(rates, key=rates.get)
        hf = run_hf(preset, weights, opts, precision, train, valid)
        results.append(report(size, ours, hf, opts.micro_batch_size * opts.seq_length, len(weights), rates,
                              preset))
    print()
    for r in results:
        print(summary_line(r))
    if opts.json is not None:
        atomic_write_text(opts.json, json.dumps({"options": {k: str(v) for k, v in vars(opts).items()},
                                                 "results": results}, indent=1))
    if opts.plot is not None:
        plot(results, opts.plot)
        print(f"wrote {opts.plot}", file=sys.stderr)


def cli(argv=None) -> int:
    from tinyllm_mcore.cli.errors import run_cli

    return run_cli(lambda: main(parse(argv)))


if __name__ == "__main__":
    raise SystemExit(cli())
