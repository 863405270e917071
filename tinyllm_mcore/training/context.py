"""The run context: what the loop derives from the flags once and hands to a stage's providers and forward step.

The parsed flags (`args`) are kept as parsed; everything computed from them — the model preset, the parallel layout,
the batch arithmetic, the report names — lives here, typed, together with the run's model chunks and (DPO) their
frozen references. Checkpoints record `checkpoint_metadata()`: the flags plus these derived values.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

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
    references: list = field(default_factory=list)  # DPO: a frozen reference per chunk, in the same order

    @property
    def tokenizer_identity(self) -> str | None:
        return getattr(self.tokenizer, "identity", None)

    def reference_for(self, model):
        """The frozen reference paired with this model chunk (as megatron's schedule passes it)."""
        for chunk, reference in zip(self.chunks, self.references):
            if chunk is model:
                return reference
        raise LookupError("no reference model was built for this model chunk")

    def checkpoint_metadata(self) -> dict:
        """What a checkpoint records of the run: the flags (checkpoint.py keeps the plain values) plus the derived
        values: the preset and head (converters, evaluation and chat rebuild the model from them), the tokenizer's
        identity (checked on load) and the batch arithmetic (for whoever reads a checkpoint's run)."""
        return {**vars(self.args),
                "preset": dataclasses.asdict(self.preset),
                "model_head": self.model_head,
                "tokenizer_identity": self.tokenizer_identity,
                "global_batch_size": self.batch.global_batch_size,
                "num_microbatches": self.batch.num_microbatches,
                "data_parallel_size": self.layout.data}
