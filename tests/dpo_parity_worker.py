"""python tests/dpo_parity_worker.py --make-checkpoints OUT_DIR, then
torchrun --nproc-per-node 2 tests/dpo_parity_worker.py OUT_DIR: DPO numbers for the same weights and data at
TP1 (x DP2), TP2 and PP2. Policy and reference come from two different checkpoints so the rewards are non-zero.
Rank 0 writes OUT_DIR/dpo_parity.json: {layout: first-iteration reports (before any update) + grad norm}."""
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def make_checkpoints(out: Path) -> None:
    """One process: two differently seeded initial checkpoints (policy, reference)."""
    from tests.harness import post_training_data as data
    from tinyllm_mcore import sft
    from tinyllm_mcore.runtime import distributed as rt
    from tinyllm_mcore.training.loop import parse_args, train

    init = sft.make_stage(data.sft_provider(data.corpus().sft[:4]))
    for name, seed in (("policy", "11"), ("reference", "22")):
        args = parse_args(init, data.common_flags(out, "--train-iters", "0", "--save", str(out / name),
                                                  "--micro-batch-size", "1", "--seed", seed))
        train(init, args, data.tokenizer())
        rt.destroy()


def main(out: Path) -> None:
    import torch.distributed as dist

    from tests.harness import post_training_data as data
    from megatron.core import parallel_state

    from tinyllm_mcore import dpo
    from tinyllm_mcore.training.loop import parse_args, train

    tok = data.tokenizer()
    records = data.corpus().preference[:8]

    stage = dpo.make_stage(data.preference_provider(records))
    results = {}
    for layout, flags in (("tp1", []), ("tp2", ["--tensor-model-parallel-size", "2"]),
                          ("pp2", ["--pipeline-model-parallel-size", "2"])):
        args = parse_args(stage, data.common_flags(
            out, "--train-iters", "1", "--load", str(out / "policy"), "--finetune", "--ref-load",
            str(out / "reference"), "--micro-batch-size", "1", "--global-batch-size", "8", "--beta", "0.5",
            "--label-smoothing", "0.1", *flags))
        history = train(stage, args, tok)["history"]
        results[layout] = history[0]
        parallel_state.destroy_model_parallel()  # keep the process group: re-creating it under gloo can hang
        dist.barrier()
    if dist.get_rank() == 0:
        (out / "dpo_parity.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "--make-checkpoints":
        make_checkpoints(Path(sys.argv[2]))
    else:
        main(Path(sys.argv[1]))
