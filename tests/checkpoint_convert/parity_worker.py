"""torchrun worker for the logit-parity test: load converted checkpoints at several TP/PP layouts (2 gloo processes),
run the same tokens, write full-vocab logits and per-token losses to a JSON file.

    python -m torch.distributed.run --nproc-per-node 2 parity_worker.py OUT.json TOKENS.json CKPT:TP:PP [...]
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.distributed as dist


def forward(chunks, tokens):
    """Logits [b, s, V_pad] (gathered over TP) and per-token loss [b, s] on the last stage; p2p between 2 stages."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model = chunks[0]
    b, s = tokens.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    labels = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)
    pp, rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    with torch.no_grad():
        if rank > 0:
            hidden = torch.empty(s, b, model.config.hidden_size)
            dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        if rank < pp - 1:
            out = model(tokens, position_ids, None)
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
        if rank > 0:
            model.set_input_tensor(hidden)
        logits = gather_from_tensor_model_parallel_region(model(tokens, position_ids, None))
        if rank > 0:
            model.set_input_tensor(hidden)
        loss = model(tokens, position_ids, None, labels=labels)
    return logits, loss


def main():
    from megatron.core import parallel_state as ps

    from tinyllm_mcore.runtime import distributed as rt
    from tinyllm_mcore.training.checkpoint import load_model_for_inference

    out_path, tokens_path, *configs = sys.argv[1:]
    tokens = torch.tensor(json.loads(Path(tokens_path).read_text()))
    results = {}
    for spec in configs:
        ckpt, tp, pp = spec.rsplit(":", 2)
        rt.initialize(int(tp), int(pp))
        chunks, preset = load_model_for_inference(ckpt)
        got = forward(chunks, tokens)
        # What this rank's GPTModel.sharded_state_dict() declares: dist-checkpoint key -> global shape
        # (fc1 is a ShardedTensorFactory, [gate; up] split per TP rank at save time: no single global shape here)
        shapes = {sh.key: list(sh.global_shape) if hasattr(sh, "global_shape") else None
                  for sh in chunks[0].sharded_state_dict().values() if not sh.key.endswith("_extra_state")}
        results.setdefault("sharded_shapes", {})[f"{tp}:{pp}"] = shapes
        if got is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
            logits, loss = got
            results[spec] = {"logits": logits[..., :preset.vocab_size].tolist(), "loss": loss.tolist()}
        ps.destroy_model_parallel()  # keep the gloo process group; re-create only megatron's groups
    # Each rank writes what it holds; the test merges the files.
    rt.destroy()
    Path(f"{out_path}.{os.environ['RANK']}").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
