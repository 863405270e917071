"""Generation: the KV cache reproduces full recomputation, ragged batches equal single prompts, sampling filters
follow Hugging Face's semantics, and greedy output equals transformers' generate on the HF export."""
import sys
from pathlib import Path

import pytest
import torch

from tests.harness import post_training_data as data

from tinyllm_mcore.inference import generate as inference


def naive_greedy(model, prompt, steps, vocab):
    """No cache: recompute the whole sequence for every new token."""
    ids = list(prompt)
    for _ in range(steps):
        tokens = torch.tensor([ids])
        with torch.no_grad():
            logits = model(tokens, torch.arange(len(ids)).unsqueeze(0), None)
        ids.append(int(logits[0, -1, :vocab].argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def sft_generator():
    from tinyllm_mcore.runtime import distributed as rt

    generator, preset = inference.load_generator(str(data.checkpoints()["sft"]), data.tokenizer())
    yield generator, preset
    rt.destroy()


def test_kv_cache_matches_recomputation_and_ragged_batches(sft_generator):
    generator, preset = sft_generator
    tok = data.tokenizer()
    prompts = [tok.chat_prompt_ids([{"role": "user", "content": r["question"]}], system="")
               for r in data.corpus().sft[:3]]
    prompts.append(prompts[0][:5])  # a much shorter prompt in the same batch
    params = inference.SamplingParams(max_new_tokens=12, greedy=True)  # no stop: always 12 tokens
    batched = generator.generate(prompts, params)
    for prompt, out in zip(prompts, batched):
        assert out == naive_greedy(generator.model, prompt, 12, preset.vocab_size)
        assert out == generator.generate([prompt], params)[0]


def test_sampling_filters_match_transformers():
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    torch.manual_seed(0)
    logits, seen = torch.randn(3, 50), torch.randint(0, 50, (3, 7))
    params = inference.SamplingParams(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone())
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8)):
        expected = warper(seen, expected)
    torch.testing.assert_close(inference.process_logits(logits, seen, params), expected)
    # seeded sampling is reproducible and stays inside the filtered support
    gen = lambda: inference.sample(logits, seen, params, torch.Generator().manual_seed(3))  # noqa: E731
    first = gen()
    assert torch.equal(first, gen())
    assert torch.isfinite(expected.gather(1, first[:, None])).all()


def test_bad_sampling_params_and_vocab_mismatch(tmp_path):
    with pytest.raises(ValueError, match="top-p"):
        inference.SamplingParams(top_p=0.0).validate()
    with pytest.raises(ValueError, match="temperature"):
        inference.SamplingParams(temperature=-1).validate()

    class OtherVocab:
        vocab_size = 64798

    from tinyllm_mcore.checkpoint import io as ckpt

    saved = ckpt.read_checkpoint(ckpt.resolve_load_dir(data.checkpoints()["sft"]))
    with pytest.raises(ValueError, match="-token vocabulary and this run's tokenizer 64798"):
        ckpt.check_tokenizer(saved, OtherVocab.vocab_size, None)


@pytest.fixture(scope="module")
def hf_export(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from tinyllm_mcore.convert import convert_mcore_to_hf

    out = convert_mcore_to_hf(data.checkpoints()["sft"], tmp_path_factory.mktemp("hf") / "hf",
                              tokenizer_model=data.tokenizer().model_path, log=lambda msg: None)
    return transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def hf_greedy(hf, prompt, max_new_tokens, stop_ids, repetition_penalty=1.0):
    """transformers' greedy continuation; the penalty is passed explicitly, as the export's generation_config
    carries the seed's sampling defaults (repetition penalty 1.1)."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=repetition_penalty,
                          eos_token_id=list(stop_ids), pad_token_id=data.tokenizer().pad)
    return out[0, len(prompt):].tolist()


def hf_prompts():
    tok = data.tokenizer()
    records = data.corpus().sft[:2] + [r for r in data.corpus().eval if r["split"] == "heldout_phrasing"][:2]
    return [tok.chat_prompt_ids([{"role": "user", "content": r["question"]}], system="") for r in records]


def test_greedy_generation_equals_hf_export(sft_generator, hf_export):
    """Several prompts in one ragged batch, with and without a repetition penalty, token for token."""
    generator, _ = sft_generator
    tok = data.tokenizer()
    prompts = hf_prompts()
    assert len(set(map(len, prompts))) > 1  # a ragged batch
    for penalty in (1.0, 1.1):
        params = inference.SamplingParams(max_new_tokens=20, greedy=True, stop_ids=[tok.eos],
                                          repetition_penalty=penalty)
        ours = generator.generate(prompts, params, keep_stop_token=True)
        for prompt, mine in zip(prompts, ours):
            assert mine == hf_greedy(hf_export, prompt, 20, [tok.eos], penalty), (penalty, prompt)
            assert len(mine) >= 3


@pytest.mark.distributed
def test_tp2_generate_cli_equals_hf_export(hf_export, tmp_path):
    """tools/generate.py under torchrun at TP2 (gathered logits, every rank sampling) answers as the HF export."""
    import json
    import os
    import subprocess

    from tests.harness.distributed import free_port

    tok = data.tokenizer()
    records = data.corpus().sft[:2] + [r for r in data.corpus().eval if r["split"] == "heldout_phrasing"][:2]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           str(Path(__file__).resolve().parents[2] / "tools" / "generate.py"),
           "--load", str(data.checkpoints()["sft"]), "--tokenizer-model", tok.model_path,
           "--tensor-model-parallel-size", "2", "--greedy", "--max-new-tokens", "20", "--chat", "--system", "",
           "--json"] + sum((["--prompt", r["question"]] for r in records), [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = [json.loads(line)["ids"] for line in proc.stdout.splitlines() if line.startswith("{")]
    stops = inference.chat_stop_ids(tok)
    assert len(ours) == len(records)
    for prompt, mine in zip(hf_prompts(), ours):
        theirs = hf_greedy(hf_export, prompt, 20, stops)
        assert mine == (theirs[:-1] if theirs and theirs[-1] in stops else theirs)
        assert len(mine) >= 3


def test_moe_layers_generate_as_recomputation(sft_generator):
    """MoE layers go through CachedDecoder's module path (megatron's MoELayer): same greedy tokens as recomputing."""
    from dataclasses import replace

    from tinyllm_mcore.model.build import build_model, transformer_config

    _, preset = sft_generator  # its runtime (TP1) is initialised
    preset = replace(preset, num_experts=4, moe_router_topk=2)
    torch.manual_seed(0)
    model = build_model(preset, transformer_config(preset, use_cpu_initialization=True, init_method_std=0.2)).eval()
    assert type(model.decoder.layers[0].mlp).__name__ == "MoELayer"
    generator = inference.Generator(model, preset.vocab_size, preset.max_position_embeddings)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 30, 40, 50, 60, 70, 80, 90]]
    outputs = generator.generate(prompts, inference.SamplingParams(max_new_tokens=10, greedy=True))
    for prompt, out in zip(prompts, outputs):
        assert out == naive_greedy(model, prompt, 10, preset.vocab_size)


def test_output_layer_paths_follow_weight_updates(sft_generator):
    """Both output-layer paths (the weight itself up to FEW_ROWS sequences, the Generator's cached [h, vocab] copy
    above) give recomputation's tokens, also after an in-place update of the weight (the copy is remade)."""
    from tinyllm_mcore.inference.decoding import FEW_ROWS

    generator, preset = sft_generator
    weight = generator.model.output_layer.weight
    params = inference.SamplingParams(max_new_tokens=6, greedy=True)
    batches = {"single": [[5, 6, 7, 8]], "copy": [[5 + i, 6, 7, 8 + i % 3][: 2 + i % 3] for i in range(FEW_ROWS + 1)]}

    def check(batch):
        outputs = generator.generate(batch, params)
        assert outputs == [naive_greedy(generator.model, prompt, 6, preset.vocab_size) for prompt in batch]
        return outputs

    before = {name: check(batch) for name, batch in batches.items()}
    original = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.copy_(torch.roll(original, 1, dims=0))  # token t's logit row now scores token t + 1
        for name, batch in batches.items():
            assert check(batch) != before[name], name
    finally:
        with torch.no_grad():
            weight.copy_(original)
    assert {name: check(batch) for name, batch in batches.items()} == before


@pytest.mark.parametrize("product", ["linear", "columns"])
def test_each_few_row_output_product_gives_recomputations_tokens(sft_generator, monkeypatch, product):
    """The decoder times both few-row output-layer products once and runs the faster (machine-dependent);
    TINYLLM_HEAD_PRODUCT fixes one: each gives recomputation's greedy tokens at 1 and 2 rows."""
    monkeypatch.setenv("TINYLLM_HEAD_PRODUCT", product)
    generator, preset = sft_generator
    params = inference.SamplingParams(max_new_tokens=6, greedy=True)
    for batch in ([[5, 6, 7, 8]], [[5, 6, 7, 8], [9, 10, 11]]):
        assert generator.generate(batch, params) == [naive_greedy(generator.model, p, 6, preset.vocab_size)
                                                     for p in batch]


def test_head_product_is_measured_once_per_shape_and_env_checked(monkeypatch):
    from tinyllm_mcore.inference import decoding

    monkeypatch.delenv("TINYLLM_HEAD_PRODUCT", raising=False)
    monkeypatch.setattr(decoding, "_HEAD_PRODUCT_CHOICE", {})
    weight, hidden = torch.randn(3000, 64), torch.randn(2, 64)
    choice = decoding.head_product(weight, hidden)
    assert choice in decoding.HEAD_PRODUCTS and len(decoding._HEAD_PRODUCT_CHOICE) == 1
    for name, fn in decoding.HEAD_PRODUCTS.items():
        torch.testing.assert_close(fn(weight, hidden), hidden @ weight.t(), rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(decoding.HEAD_PRODUCTS["columns"](weight, hidden[:1]), hidden[:1] @ weight.t(),
                               rtol=1e-5, atol=1e-5)
    decoding._HEAD_PRODUCT_CHOICE[next(iter(decoding._HEAD_PRODUCT_CHOICE))] = "columns"  # the cached choice stays
    assert decoding.head_product(weight, hidden) == "columns"
    monkeypatch.setenv("TINYLLM_HEAD_PRODUCT", "fast")
    with pytest.raises(ValueError, match="TINYLLM_HEAD_PRODUCT=fast"):
        decoding.head_product(weight, hidden)
