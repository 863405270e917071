"""The run context: what the loop derives from the flags once and hands to a stage's providers and forward step.

The parsed flags (`args`) are kept as parsed; everything computed from them — the model preset, the parallel layout,
the batch arithmetic, the report names — lives here, typed, together with the run's model chunks and (DPO) their
frozen references. Checkpoints record `checkpoint_metadata()` (checkpoint/metadata.py's schema): these derived
values, with the flags for information only.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from tinyllm_mcore.checkpoint.metadata import CheckpointMetadata, plain_flags
from tinyllm_mcore.model.presets import ModelPreset


@dataclass(frozen=True)
class ParallelLayout:
    tensor: int
    pipeline: int
    virtual_pipeline: int | None  # model chunks per pipeline rank; None without interleaving
    expert: int
    data: int
    data_rank: int


@dataclass(frozen=True)
class BatchPlan:
    seq_length: int
    micro_batch_size: int  # samples per micro-batch on one data-parallel rank
    global_batch_size: int  # samples per optimizer step, all ranks
    num_microbatches: int  # micro-batches per step on one rank
    sequences_per_sample: int = 1  # rows a sample puts in a batch: 2 for a (chosen, rejected) pair
    sequences_per_message: int = 1  # rows per sample in a pipeline message (DPO also sends the reference's: 4)

    @property
    def tokens_per_iteration(self) -> int:
        return self.global_batch_size * self.seq_length * self.sequences_per_sample


@dataclass
class RunContext:
    stage_name: str
    args: argparse.Namespace  # the flags as parsed and validated; nothing writes to them afterwards
    preset: ModelPreset
    tokenizer: object | None
    layout: ParallelLayout
    batch: BatchPlan
    report_names: tuple[str, ...]
    model_head: str = "lm"
    chunks: list = field(default_factory=list)  # this rank's model chunks, one per virtual pipeline stage
    references: list = field(default_factory=list)  # DPO, GRPO: a frozen reference per chunk, in the same order
    stage_state: object | None = None  # a stage's own typed run state, set by its hooks (GRPO: grpo.GRPORun)
    lora: object | None = None  # model.lora.LoraSettings of a LoRA run (--lora-rank), None for full training
    lora_base: dict | None = None  # a LoRA run's base checkpoint (checkpoint/adapters.base_record), set at load

    @property
    def tokenizer_identity(self) -> str | None:
        return getattr(self.tokenizer, "identity", None)

    def reference_for(self, model):
        """The frozen reference paired with this model chunk (as megatron's schedule passes it)."""
        for chunk, reference in zip(self.chunks, self.references):
            if chunk is model:
                return reference
        raise LookupError("no reference model was built for this model chunk")

    def checkpoint_metadata(self) -> CheckpointMetadata:
        """What a checkpoint records of the run (checkpoint/metadata.py): the preset and head (converters,
        evaluation and chat rebuild the model from them), the tokenizer (checked on load), the layout, the batch
        arithmetic, and the flags as information."""
        args = self.args
        return CheckpointMetadata(
            preset=self.preset, model_head=self.model_head, stage=self.stage_name,
            tokenizer_model=args.tokenizer_model, tokenizer_type=args.tokenizer_type,
            tokenizer_identity=self.tokenizer_identity, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
            tensor_model_parallel_size=self.layout.tensor, pipeline_model_parallel_size=self.layout.pipeline,
            use_distributed_optimizer=args.use_distributed_optimizer, seq_length=self.batch.seq_length,
            micro_batch_size=self.batch.micro_batch_size, global_batch_size=self.batch.global_batch_size,
            num_microbatches=self.batch.num_microbatches, data_parallel_size=self.layout.data,
            lora=self.lora.describe() if self.lora is not None else None, lora_base=self.lora_base,
            flags=plain_flags(args))
