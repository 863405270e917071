"""Runs in every rank (2) for tests/evaluation/conftest.py, through tests.harness.distributed.run_ranks: save a
random tiny checkpoint at TP2, then evaluate it in ppl (and gen) mode at several parallel layouts, one case each.
"""


def save_random_checkpoint(save: str, vocab_size: int) -> None:
    """At TP2, with a wide init: option scores then differ clearly (a 0.02-std random model scores all nearly alike)."""
    from tinyllm_mcore.model.build import build_model, transformer_config
    from tinyllm_mcore.model.presets import get_preset
    from tinyllm_mcore.runtime import distributed as rt
    from tinyllm_mcore.checkpoint.io import save_checkpoint
    from tinyllm_mcore.checkpoint.metadata import CheckpointMetadata

    rt.initialize(tp=2, pp=1, seed=7)
    preset = get_preset("tiny", vocab_size=vocab_size)
    config = transformer_config(preset, tensor_model_parallel_size=2, use_cpu_initialization=True, init_method_std=0.3)
    model = build_model(preset, config)
    metadata = CheckpointMetadata(preset=preset, tensor_model_parallel_size=2, pipeline_model_parallel_size=1)
    save_checkpoint(save, 1, [model], None, None, consumed_samples=0, metadata=metadata)


def evaluate_layout(save: str, tokenizer: str, benchmark_dir: str, shots: int, tp: int, pp: int) -> dict:
    """{"choices": {subject: [...]}, "scores": {subject: [[4 floats], ...]}, "responses": gen-mode answers of the
    first subject} of the checkpoint loaded at TP x PP (ppl mode scores all subjects)."""
    from tinyllm_mcore.evaluation.multiple_choice import evaluate_multiple_choice, load_tasks
    from tinyllm_mcore.evaluation.runner import open_mcore

    tasks = load_tasks(benchmark_dir, "test", shots)
    lm, encoder = open_mcore(save, tokenizer, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    result = evaluate_multiple_choice(lm, encoder, tasks, batch_size=3)
    # gen mode on one subject: KV-cached inference.Generator at PP1, re-forward through the pipeline at PP2
    gen = evaluate_multiple_choice(lm, encoder, tasks[:1], mode="gen", max_new_tokens=4, batch_size=4)
    return {"choices": {s: [r["pred"] for r in recs] for s, recs in result["records"].items()},
            "scores": {s: [r["scores"] for r in recs] for s, recs in result["records"].items()},
            "responses": [r["response_ids"] for r in gen["records"][tasks[0].subject]]}
