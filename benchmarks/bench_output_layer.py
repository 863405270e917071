"""The output layer's product at generation's few rows, three layouts, on CPU: what `decoding.CachedDecoder` picks.

    python benchmarks/bench_output_layer.py [--vocab 64896] [--hidden 512] [--rows 1 2 4 8 16] [--threads 1]

The peer is `F.linear` on megatron's [vocab, h] weight (what the layer's own forward runs); against it: `x @ C` on a
contiguous [h, vocab] copy C (`decoding.HeadCopy`, used above FEW_ROWS sequences) and `W @ xᵀ` on the weight itself
(one row goes in twice, as `_logits` does); up to FEW_ROWS the decoder times `F.linear` and `W @ xᵀ` itself
and runs the faster (`decoding.head_product`). Minimum of --repeats alternating runs, in ms.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=64896, help="padded vocabulary rows (92m's at TP1)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--repeats", type=int, default=25)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    weight = torch.randn(args.vocab, args.hidden)
    copy = weight.t().contiguous()
    print(f"output layer {args.vocab} x {args.hidden}, {args.threads} thread(s), min of {args.repeats} runs, ms")
    print("rows | F.linear (peer) | x @ copy (ratio) | W @ x^T (ratio)")
    for rows in args.rows:
        x = torch.randn(rows, args.hidden)
        columns = x.t() if rows > 1 else x.repeat(2, 1).t()
        peer = best_ms(lambda: F.linear(x, weight), args.repeats)
        over_copy = best_ms(lambda: x @ copy, args.repeats)
        on_weight = best_ms(lambda: (weight @ columns).t()[:rows].contiguous(), args.repeats)
        print(f"{rows:4d} | {peer:15.2f} | {over_copy:7.2f} ({peer / over_copy:.2f}x) | "
              f"{on_weight:7.2f} ({peer / on_weight:.2f}x)")


if __name__ == "__main__":
    main()
