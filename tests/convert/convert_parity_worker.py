"""Run by the harness on 2 ranks (tests.harness.distributed.run_ranks): load a converted checkpoint at a TP/PP layout
and return full-vocab logits, per-token losses and the sharded keys/global shapes the model declares."""
import torch
import torch.distributed as dist


def _forward(model, tokens):
    """Logits [b, s, V_pad] (gathered over TP) and per-token loss [b, s] on the last stage; p2p between 2 stages."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

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
        logits = gather_from_tensor_model_parallel_region(model(tokens, position_ids, None))
        if rank > 0:
            model.set_input_tensor(hidden)
        loss = model(tokens, position_ids, None, labels=labels)
    return logits, loss


def logits_at_layout(ckpt: str, tp: int, pp: int, tokens: list) -> dict:
    """{"sharded_shapes": {key: global shape or None}, and on the rank holding the output: "logits", "loss"}."""
    from megatron.core import parallel_state as ps

    from tinyllm_mcore.runtime import distributed as rt
    from tinyllm_mcore.inference.open import open_checkpoint

    rt.initialize(tp, pp)
    opened = open_checkpoint(ckpt)
    chunks, preset = opened.chunks, opened.preset
    got = _forward(chunks[0], torch.tensor(tokens))
    # fc1 is a ShardedTensorFactory ([gate; up] split per TP rank at save time): no single global shape here
    result = {"sharded_shapes": {sh.key: list(sh.global_shape) if hasattr(sh, "global_shape") else None
                                 for sh in chunks[0].sharded_state_dict().values()
                                 if not sh.key.endswith("_extra_state")}}
    if got is not None and ps.get_tensor_model_parallel_rank() == 0:
        logits, loss = got
        result.update(logits=logits[..., :preset.vocab_size].tolist(), loss=loss.tolist())
    return result
