"""The two kinds of model evaluation runs on, behind one small interface.

`CausalLM.logits_at(tokens, positions)` returns next-token logits over the logical vocabulary only at the positions
asked for. Multiple choice reads one or a few positions per row, so the LM head (hidden × 64798 for the seed's
vocabulary, more FLOPs than all eight layers of the 92m model) and the softmax run on those positions alone, not on
every token of a 5-shot prompt. Rows are right-padded: with causal attention, padding after a token never changes it,
so no attention mask is needed and the numbers equal an unpadded forward.

* `HFCausalLM` — a transformers causal LM (an HF export): the base model gives final hidden states, the output
  embedding is applied to the selected positions.
* `McoreCausalLM` — megatron-core GPT chunks from `inference.open.open_checkpoint` at any TP/PP. A forward pre-hook on the
  output layer selects the positions before the (vocab-parallel) LM head; logits are gathered across TP ranks; under
  pipeline parallelism megatron's forward-only schedule runs the stages and the last stage's logits are broadcast
  to every rank of the pipeline, so every rank runs the same evaluation code and holds the same results. Padded
  vocabulary rows (megatron pads the embedding to a multiple of 128 × TP) are dropped, as the HF export drops them.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch


class CausalLM:
    vocab_size: int
    max_length: int
    device: torch.device = torch.device("cpu")
    # Backends that can run a shared prefix once and continue many rows from its KV cache (see HFCausalLM).
    supports_prefix_cache: bool = False

    def logits_at(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens [b, s] (right-padded), positions [b, n] -> float32 logits [b, n, vocab_size]."""
        raise NotImplementedError

    def generate_greedy(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                        stop_ids: Sequence[int]) -> list[list[int]]:
        """Greedy continuation of each prompt (without the stop token). Plain re-forward per step: answers in
        multiple-choice evaluation are a few tokens long."""
        outputs: list[list[int]] = [[] for _ in prompts]
        active = list(range(len(prompts)))
        stops = set(int(s) for s in stop_ids)
        for _ in range(max_new_tokens):
            rows = [list(prompts[i]) + outputs[i] for i in active]
            rows = [r[-self.max_length:] for r in rows]
            tokens = pad_rows(rows)
            last = torch.tensor([[len(r) - 1] for r in rows])
            next_ids = self.logits_at(tokens, last)[:, 0].argmax(-1).tolist()
            still = []
            for i, token in zip(active, next_ids):
                if token in stops:
                    continue
                outputs[i].append(int(token))
                still.append(i)
            active = still
            if not active:
                break
        return outputs


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int = 0) -> torch.Tensor:
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    return tokens


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face


class HFCausalLM(CausalLM):
    def __init__(self, model, max_length: int | None = None):
        self.model = model.eval()
        self.vocab_size = int(model.config.vocab_size)
        self.max_length = int(max_length or getattr(model.config, "max_position_embeddings", 2048))
        self.device = next(model.parameters()).device

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32, device: str | None = None):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        if device:
            model.to(device)
        return cls(model)

    @torch.inference_mode()
    def logits_at(self, tokens, positions):
        tokens, positions = tokens.to(self.device), positions.to(self.device)
        hidden = self.model.base_model(input_ids=tokens, use_cache=False).last_hidden_state  # [b, s, h], final norm
        return self._head(hidden, positions)

    def _head(self, hidden, positions):
        rows = torch.arange(hidden.size(0), device=self.device).unsqueeze(1).expand_as(positions)
        logits = self.model.get_output_embeddings()(hidden[rows, positions])
        return logits[..., : self.vocab_size].float().cpu()

    # k-shot prompts of one subject share their header and shots: run that prefix once, keep its KV cache, and
    # continue every row of a batch from it (the cache is copied and repeated per row; causal attention makes the
    # result the same as forwarding each whole row).
    supports_prefix_cache = True

    @torch.inference_mode()
    def prefix_cache(self, prefix: list[int]):
        tokens = torch.tensor([prefix], device=self.device)
        return self.model.base_model(input_ids=tokens, use_cache=True).past_key_values

    @torch.inference_mode()
    def logits_after_prefix(self, cache, prefix_length: int, tokens, positions):
        """tokens [b, s] continue the cached prefix; positions [b, n] index into tokens."""
        import copy

        tokens, positions = tokens.to(self.device), positions.to(self.device)
        cache = copy.deepcopy(cache)
        cache.batch_repeat_interleave(tokens.size(0))
        position_ids = torch.arange(prefix_length, prefix_length + tokens.size(1), device=self.device)
        import inspect

        # transformers 5 names the argument `cache` (`past_key_values` still works there, with a warning)
        name = "cache" if "cache" in inspect.signature(self.model.base_model.forward).parameters else "past_key_values"
        hidden = self.model.base_model(input_ids=tokens, position_ids=position_ids.expand_as(tokens),
                                       use_cache=True, **{name: cache}).last_hidden_state
        return self._head(hidden, positions)


# ---------------------------------------------------------------------------------------------------------------
# megatron-core


class McoreCausalLM(CausalLM):
    def __init__(self, chunks, preset):
        from megatron.core import parallel_state as ps

        from tinyllm_mcore.checkpoint.io import unwrap

        if len(chunks) != 1:
            raise ValueError("evaluation expects one model chunk per rank (load without virtual pipeline stages)")
        self.model = chunks[0]
        self.gpt = unwrap(self.model)
        self.preset = preset
        self.vocab_size = preset.vocab_size
        self.max_length = preset.max_position_embeddings
        self.device = next(self.model.parameters()).device
        self.pp_size = ps.get_pipeline_model_parallel_world_size()
        self.is_last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
        self._generator = None

    @contextlib.contextmanager
    def _select_positions(self, positions: torch.Tensor):
        """Feed the LM head only the hidden states at `positions` ([b, n]); hidden states are [s, b, h]."""
        if not self.is_last_stage:
            yield
            return

        def hook(module, args, kwargs):
            hidden = args[0]
            batch = torch.arange(hidden.size(1), device=hidden.device).unsqueeze(0)
            return (hidden[positions.t(), batch],) + tuple(args[1:]), kwargs  # [n, b, h]

        handle = self.gpt.output_layer.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def _forward(self, tokens, positions):
        position_ids = torch.arange(tokens.size(1), device=self.device).unsqueeze(0).expand_as(tokens)
        with self._select_positions(positions):
            return self.model(tokens, position_ids, None, runtime_gather_output=True)

    @torch.no_grad()
    def logits_at(self, tokens, positions):
        tokens, positions = tokens.to(self.device), positions.to(self.device)
        b, n = positions.shape
        if self.pp_size == 1:
            return self._forward(tokens, positions)[..., : self.vocab_size].float().cpu()
        # The last stage holds the logits; every stage of the pipeline returns them.
        from megatron.core import parallel_state as ps

        import torch.distributed as dist

        logits = self._pipeline_forward(tokens, positions)
        if self.is_last_stage:
            logits = logits[..., : self.vocab_size].float().contiguous()
        else:
            logits = torch.empty(b, n, self.vocab_size, dtype=torch.float32, device=self.device)
        dist.broadcast(logits, ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
        return logits.cpu()

    def _pipeline_forward(self, tokens, positions):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator, model):
            batch_tokens, batch_positions = next(data_iterator)
            position_ids = torch.arange(batch_tokens.size(1), device=self.device).unsqueeze(0).expand_as(batch_tokens)
            with self._select_positions(batch_positions):
                output = model(batch_tokens, position_ids, None, runtime_gather_output=True)
            return output, None  # no loss function: the schedule stores the last stage's output

        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([(tokens, positions)]), model=self.model,
            num_microbatches=1, seq_length=tokens.size(1), micro_batch_size=tokens.size(0),
            decoder_seq_length=tokens.size(1), forward_only=True)
        return outputs[0] if self.is_last_stage else None

    def generate_greedy(self, prompts, max_new_tokens, stop_ids):
        if self.pp_size > 1:  # inference.Generator runs at PP1 only: re-forward through the pipeline instead
            return super().generate_greedy(prompts, max_new_tokens, stop_ids)
        from tinyllm_mcore.inference.generate import Generator, SamplingParams

        if self._generator is None:
            self._generator = Generator(self.model, self.vocab_size, self.max_length)
        params = SamplingParams(max_new_tokens=max_new_tokens, greedy=True, stop_ids=tuple(stop_ids))
        return self._generator.generate([list(p) for p in prompts], params)
