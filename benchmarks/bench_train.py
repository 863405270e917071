"""Training throughput and MFU: tinyllm-mcore (megatron-core) vs HF transformers Qwen2ForCausalLM, side by side.

Same shapes (a seed preset at vocab 64798), same batch, same thread count, one process, each in its best supported
precision (fp32, and bf16: megatron bf16 params with fp32 main weights/grads vs HF fp32 weights under bf16 autocast).
Both run torch's fused AdamW kernel (the peer's as transformers' Trainer does by default) on the same loss.
Prints tokens/s, MFU and ours/HF ratios.

MFU = tokens/s × model FLOPs per token / peak FLOP/s, FLOPs per token = model.flops_per_token (matmuls only:
3 × forward, forward = 2 × matmul params + 4 × seq × hidden per layer for attention scores/context + 2 × hidden ×
vocab for the LM head). The peak is the best square-matmul rate measured here for that dtype (on GPU: datasheet).

    python benchmarks/bench_train.py --presets 16m 42m --seq-length 512 --micro-batch-size 4 --threads 2
"""
from __future__ import annotations

import argparse
import time

import torch


def hf_throughput(preset, seq, mbs, steps, warmup, bf16: bool, device) -> float:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=preset.vocab_size, hidden_size=preset.hidden_size,
                      intermediate_size=preset.ffn_hidden_size, num_hidden_layers=preset.num_layers,
                      num_attention_heads=preset.num_attention_heads, num_key_value_heads=preset.kv_heads,
                      max_position_embeddings=preset.max_position_embeddings, rms_norm_eps=preset.norm_eps,
                      rope_theta=preset.rope_theta, tie_word_embeddings=False, attn_implementation="sdpa")
    model = Qwen2ForCausalLM(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01, fused=True)
    tokens = torch.randint(0, preset.vocab_size, (mbs, seq), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _timed(step, steps, warmup, mbs * seq, device)


def ours_throughput(preset_name, seq, mbs, steps, warmup, bf16: bool, device) -> float:
    from tinyllm_mcore.training.batches import lm_forward_step
    from tinyllm_mcore.training.loop import Stage, parse_args, setup, train_step, micro_batches
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    class RandomTokens(torch.utils.data.Dataset):
        def __len__(self):
            return 1 << 20

        def __getitem__(self, i):
            t = torch.randint(0, 64798, (seq + 1,))
            return {"tokens": t[:-1], "labels": t[1:], "loss_mask": torch.ones(seq), "position_ids": torch.arange(seq)}

    stage = Stage("bench", lambda ctx: (RandomTokens(), None, None), lm_forward_step)
    argv = ["--model-size", preset_name, "--seq-length", str(seq), "--micro-batch-size", str(mbs), "--mock-data",
            "--train-iters", str(steps + warmup), "--lr-warmup-iters", "1"] + (["--bf16"] if bf16 else [])
    args = parse_args(stage, argv)
    run = setup(stage, args)
    it = [micro_batches(RandomTokens(), consumed_samples=0, micro_batch_size=mbs, dp_rank=0, dp_size=1)]
    fb = get_forward_backward_func()

    def step():
        train_step(stage, run.ctx, fb, it, run.optimizer, run.scheduler)

    try:
        return _timed(step, steps, warmup, mbs * seq, device)
    finally:
        parallel_state.destroy_model_parallel()


def _timed(step, steps, warmup, tokens_per_step, device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return tokens_per_step * steps / (time.perf_counter() - t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["16m", "42m"])
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    from tinyllm_mcore.model.gpt import flops_per_token
    from tinyllm_mcore.model.presets import get_preset
    from tinyllm_mcore.runtime import distributed as rt
    from tinyllm_mcore.training.metrics import peak_tflops

    rt.initialize()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peaks = {prec: peak_tflops(torch.bfloat16 if prec == "bf16" else torch.float32) for prec in args.precisions}
    print(f"device {device}, threads {args.threads}; measured matmul peak: " +
          ", ".join(f"{k} {v * 1000:.0f} GFLOP/s" for k, v in peaks.items()))
    print(f"{'preset':>6} {'prec':>5} {'HF tok/s':>9} {'HF MFU':>7} {'ours tok/s':>10} {'ours MFU':>8} {'ours/HF':>7}")
    for name in args.presets:
        preset = get_preset(name)
        fpt = flops_per_token(preset, args.seq_length)
        best_hf, best_ours = 0.0, 0.0
        for prec in args.precisions:
            bf16 = prec == "bf16"
            hf = hf_throughput(preset, args.seq_length, args.micro_batch_size, args.steps, args.warmup, bf16, device)
            ours = ours_throughput(name, args.seq_length, args.micro_batch_size, args.steps, args.warmup, bf16, device)
            best_hf, best_ours = max(best_hf, hf), max(best_ours, ours)
            peak = peaks[prec] * 1e12
            print(f"{name:>6} {prec:>5} {hf:9.0f} {hf * fpt / peak:7.1%} {ours:10.0f} {ours * fpt / peak:8.1%} "
                  f"{ours / hf:7.2f}x")
        print(f"{name:>6}  best: ours {best_ours:.0f} tok/s vs HF {best_hf:.0f} tok/s = {best_ours / best_hf:.2f}x "
              f"(goal: >= 1.5x at 92m, >= 2x at 42m; issue 25)")
    rt.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
