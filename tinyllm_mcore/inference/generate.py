"""Text generation on a megatron-core GPTModel with a KV cache: used by tools/generate.py, tools/chat.py and eval.

The forward is `decoding.CachedDecoder`: the model's own modules and weights with a cache of rotated keys
(megatron's StaticInferenceContext re-rotates every cached key in every layer at every step; its rotated-key paths
need CUDA), the whole batch of prompts processed in one forward, and logits for each sequence's last position only.
For batches of more than `decoding.FEW_ROWS` sequences a Generator keeps one [h, vocab] copy of the output layer's
weight across calls (`decoding.HeadCopy`, remade if the weight changes). Logits are gathered across tensor-parallel
ranks, so every TP rank samples the same token from the same logits with an identically seeded generator: generation
runs at any TP with all ranks executing this same loop.
Pipeline parallelism is not supported for generation (load at PP1; dist checkpoints reshard on load).

Prompts of different lengths share one batch: they are right-padded for the prompt forward and each sequence then
decodes at its own positions, so every sequence sees exactly the positions and tokens it would see alone.

Sampling follows Hugging Face's order and semantics: repetition penalty (over prompt and generated tokens), then
temperature, top-k, top-p; temperature 0 or `greedy=True` takes the argmax.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from tinyllm_mcore.checkpoint.io import add_load_check_flags


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1.0 = no nucleus filter
    repetition_penalty: float = 1.0  # 1.0 = none; >1 discourages tokens already present (CTRL / HF semantics)
    stop_ids: Sequence[int] = field(default_factory=tuple)  # generation of a sequence ends after one of these
    seed: int = 1234

    def validate(self) -> "SamplingParams":
        if self.max_new_tokens < 1:
            raise ValueError(f"max new tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top-k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition penalty must be > 0, got {self.repetition_penalty}")
        return self

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


def process_logits(logits: torch.Tensor, seen_ids: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[b, V] float logits -> filtered logits (-inf where excluded). `seen_ids` [b, t]: tokens so far."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen_ids.numel():
        score = torch.gather(logits, 1, seen_ids)
        score = torch.where(score < 0, score * params.repetition_penalty, score / params.repetition_penalty)
        logits = logits.scatter(1, seen_ids, score)
    if params.is_greedy:
        return logits
    if params.temperature != 1.0:  # (x / 1.0 is x: no [b, V] pass for it)
        logits = logits / params.temperature
    if params.top_k > 0:
        k = min(params.top_k, logits.size(-1))
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - params.top_p)
        remove_sorted[:, -1] = False  # always keep the most likely token
        remove = remove_sorted.scatter(1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sample(logits: torch.Tensor, seen_ids: torch.Tensor, params: SamplingParams,
           generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids [b] from last-position logits [b, V]."""
    logits = process_logits(logits, seen_ids, params)
    if params.is_greedy:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Generator:
    """KV-cached generation on one (PP1) megatron GPTModel; `vocab_size` is the logical vocab (padding rows of the
    vocab-parallel embedding are never sampled)."""

    def __init__(self, model, vocab_size: int, max_sequence_length: int):
        from megatron.core import parallel_state as ps

        from tinyllm_mcore.inference.decoding import HeadCopy

        if ps.model_parallel_is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
            raise ValueError("generation runs at pipeline-parallel size 1 (any TP): load the checkpoint with PP1")
        self.model = model
        self.vocab_size = vocab_size
        self.max_sequence_length = max_sequence_length
        self.device = next(model.parameters()).device
        self.head_copy = HeadCopy()  # batches over FEW_ROWS: an [h, vocab] output layer copy, kept while unchanged

    @torch.no_grad()  # not inference_mode: megatron caches its RoPE table, which a later training forward may reuse
    def stream(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Iterator[list[int | None]]:
        """Yield, per decoding step, each sequence's new token (None where it has finished)."""
        from tinyllm_mcore.inference.decoding import CachedDecoder

        params.validate()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        lengths = [len(p) for p in prompts]
        longest = max(lengths)
        if longest >= self.max_sequence_length:
            raise ValueError(f"prompt of {longest} tokens leaves no room in the model's "
                             f"{self.max_sequence_length}-token context")
        batch, total = len(prompts), min(longest + params.max_new_tokens, self.max_sequence_length)
        # Each sequence generates what it would alone: max_new_tokens, or up to the end of the context.
        budget = torch.tensor([min(params.max_new_tokens, self.max_sequence_length - n) for n in lengths],
                              device=self.device)
        # Tokens so far, right-padded with each sequence's own first token: the repetition penalty, which reads
        # [b, t] ids, then sees only a sequence's own tokens (a duplicate changes nothing).
        tokens = torch.tensor([list(p) + [p[0]] * (total - len(p)) for p in prompts], dtype=torch.long,
                              device=self.device)
        last = torch.tensor(lengths, device=self.device) - 1  # each sequence's last token position
        stop = torch.tensor(sorted(set(int(s) for s in params.stop_ids)) or [-1], device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(params.seed)
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        produced = torch.zeros(batch, dtype=torch.long, device=self.device)

        self.model.eval()
        decoder = CachedDecoder(self.model, batch, total, head_copy=self.head_copy)
        logits = decoder.prefill(tokens[:, :longest], last + 1)
        while True:
            sampled = sample(logits[:, : self.vocab_size], tokens[:, : int(last.max()) + 1], params, generator)
            generating = ~done
            new = torch.where(done, tokens[decoder.rows, last], sampled)  # a finished sequence keeps its last token
            last = last + generating.long()
            tokens[decoder.rows, last] = new
            produced += generating.long()
            yield [token if active else None for token, active in zip(new.tolist(), generating.tolist())]
            done |= generating & (torch.isin(new, stop) | (produced >= budget))
            if bool(done.all()):
                return
            logits = decoder.decode(new, last)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 keep_stop_token: bool = False) -> list[list[int]]:
        """New tokens per prompt (ending before the stop token unless `keep_stop_token`)."""
        out: list[list[int]] = [[] for _ in prompts]
        stops = set(int(s) for s in params.stop_ids)
        for step in self.stream(prompts, params):
            for i, token in enumerate(step):
                if token is not None:
                    out[i].append(token)
        if not keep_stop_token:
            out = [ids[:-1] if ids and ids[-1] in stops else ids for ids in out]
        return out


class TextStreamer:
    """Turns a growing list of ids into printable text deltas (SentencePiece pieces may be partial characters)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.printed = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.detokenize(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next piece
            return ""
        delta, self.printed = text[len(self.printed):], text
        return delta


# ---------------------------------------------------------------------------------------------------------------
# Loading a checkpoint for generation (tools/generate.py, tools/chat.py, evaluation)


def load_generator(load: str, tokenizer=None, *, tensor_parallel_size: int = 1, bf16: bool = False,
                   max_sequence_length: int | None = None, allow_tokenizer_change: bool = False,
                   verify: bool = True, require_manifest: bool = False) -> tuple[Generator, object]:
    """The checkpoint opened at TP=`tensor_parallel_size` (inference.open: tokenizer, layout and manifest checked);
    (Generator, preset)."""
    from tinyllm_mcore.inference.open import open_checkpoint

    opened = open_checkpoint(load, tokenizer, tensor_parallel_size=tensor_parallel_size, bf16=bf16,
                             allow_tokenizer_change=allow_tokenizer_change, verify=verify,
                             require_manifest=require_manifest)
    preset = opened.preset
    return Generator(opened.model, preset.vocab_size, max_sequence_length or preset.max_position_embeddings), preset


def chat_stop_ids(tokenizer) -> list[int]:
    """Stop on eos, and on a role marker should the model start the next turn itself."""
    ids = [tokenizer.eos]
    for role in ("<|user|>", "<|observation|>", "<|system|>"):
        try:
            ids.append(tokenizer.token_to_id(role))
        except KeyError:
            pass
    return ids


def add_generation_args(parser) -> None:
    """Flags shared by tools/generate.py and tools/chat.py."""
    parser.add_argument("--load", required=True, help="mcore checkpoint (save root or iter_* dir)")
    parser.add_argument("--tokenizer-model", required=True, help="sentencepiece model (or tokenizer dir)")
    parser.add_argument("--tokenizer-type", default="auto")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1,
                        help="launch with torchrun --nproc-per-node TP for TP > 1")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (same as --temperature 0)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--system", default=None, help="system prompt (default: the seed's; '' for none)")
    add_load_check_flags(parser)


def sampling_from_args(args, stop_ids) -> SamplingParams:
    return SamplingParams(max_new_tokens=args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                          stop_ids=tuple(stop_ids), seed=args.seed).validate()


def generator_from_args(args):
    """(tokenizer, Generator) for the CLI flags above."""
    from tinyllm_mcore.tokenizer.core import Tokenizer

    tokenizer = Tokenizer.load(args.tokenizer_model, args.tokenizer_type)
    generator, _ = load_generator(args.load, tokenizer, tensor_parallel_size=args.tensor_model_parallel_size,
                                  bf16=args.bf16, allow_tokenizer_change=args.allow_tokenizer_change,
                                  verify=not args.no_verify_checkpoint, require_manifest=args.require_manifest)
    return tokenizer, generator
