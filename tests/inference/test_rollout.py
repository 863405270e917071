"""GRPO rollouts (inference/rollout.py): the same tokens at every layout (TP1, TP2, TP2 with sequence parallelism,
PP2 with 2 layers and with 1 layer per stage) on the policy as training holds it, a row's tokens independent of its
batch, stop tokens, the token budget, the train/eval mode restored; and the inverse-CDF sampler's distribution."""
import pytest
import torch

from tests.harness.distributed import run_ranks
from tests.inference import rollout_worker as worker

WORKER = "tests.inference.rollout_worker"


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """One 2-rank launch: each case's results on both ranks, {case: [rank 0's, rank 1's]}."""
    tmp = tmp_path_factory.mktemp("rollout")
    four, two = str(tmp / "four_layers"), str(tmp / "two_layers")
    cases = {
        "tp1": (f"{WORKER}:save_reference", {"save": four, "num_layers": 4}),
        "tp1_two_layers": (f"{WORKER}:save_reference", {"save": two, "num_layers": 2}),
        "tp2": (f"{WORKER}:rollouts_at", {"load": four, "tp": 2}),
        "tp2_sequence_parallel": (f"{WORKER}:rollouts_at", {"load": four, "tp": 2, "sequence_parallel": True}),
        "pp2": (f"{WORKER}:rollouts_at", {"load": four, "pp": 2}),
        "pp2_one_layer_per_stage": (f"{WORKER}:rollouts_at", {"load": two, "pp": 2}),
        "refuse_vpp": (f"{WORKER}:refusal", {"layout": "vpp"}),
        "refuse_moe_sequence_parallel": (f"{WORKER}:refusal", {"layout": "moe"}),
        "refuse_mismatch": (f"{WORKER}:refusal", {"layout": "mismatch"}),
    }
    per_rank = run_ranks(None, nproc=2, cases=cases, timeout=600)
    return {name: [rank[name] for rank in per_rank] for name in cases}


@pytest.mark.distributed
@pytest.mark.parametrize("case,reference", [("tp2", "tp1"), ("tp2_sequence_parallel", "tp1"), ("pp2", "tp1"),
                                            ("pp2_one_layer_per_stage", "tp1_two_layers")])
def test_every_layout_samples_the_tp1_tokens_on_every_rank(layouts, case, reference):
    expected = layouts[reference][0]
    assert layouts[reference][1] == expected  # the two DP replicas of the reference agree
    for rank, result in enumerate(layouts[case]):
        assert result == expected, (case, rank)


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["tp1", "tp1_two_layers"])
def test_rows_are_independent_stop_and_keep_their_budget(layouts, case):
    result = layouts[case][0]
    rows = len(worker.PROMPTS) * worker.GROUP
    assert len(result["sampled"]) == rows and len(result["greedy"]) == len(worker.PROMPTS)
    assert all(len(row) == worker.NEW_TOKENS for row in result["sampled"] + result["greedy"])  # no stop ids
    assert all(0 <= token < worker.VOCAB for row in result["sampled"] for token in row)
    # a row's tokens: the same alone, in slices of 2 rows, in the whole batch; the G rows of a prompt differ
    assert result["sampled_alone"] == result["sampled_sliced"] == result["sampled"]
    for p in range(len(worker.PROMPTS)):
        group = result["sampled"][p * worker.GROUP:(p + 1) * worker.GROUP]
        assert len({tuple(row) for row in group}) == worker.GROUP
    assert result["greedy_penalised"] != result["greedy"]  # a penalty under 1 favours the tokens seen so far
    # each row ends at its first stop token (kept), with the tokens it sampled without stop ids before it
    stops = set(result["stop_ids"])
    expected = [next((row[:i + 1] for i, t in enumerate(row) if t in stops), row) for row in result["sampled"]]
    assert result["stopped"] == expected
    assert sum(len(row) < worker.NEW_TOKENS for row in expected) >= 5
    # a prompt 3 positions short of the context gets 3 tokens; the other rows of its batch their full budget
    assert [len(row) for row in result["long_prompt"]] == [3, 3, worker.NEW_TOKENS, worker.NEW_TOKENS]
    assert result["modes_restored"]


@pytest.mark.distributed
def test_virtual_pipeline_moe_under_sequence_parallelism_and_mismatched_ranks_are_refused(layouts):
    assert all("virtual pipeline" in message for message in layouts["refuse_vpp"])
    assert all("sequence parallelism needs dense MLP layers" in message
               for message in layouts["refuse_moe_sequence_parallel"])
    assert all("different prompts" in message for message in layouts["refuse_mismatch"])  # on both ranks


def test_inverse_cdf_sampling_follows_the_filtered_distribution():
    """Row i's token at uniform u is the first whose cumulative probability exceeds u x the total (found per block
    of SAMPLING_BLOCK tokens, then within the block): the same tokens as one float64 cumulative sum over the whole
    vocabulary, frequencies within four standard deviations of softmax(logits / T) after top-k, and filtered tokens
    never drawn. The vocabulary is one whole block and a partial one."""
    from tinyllm_mcore.inference.generate import SamplingParams, process_logits
    from tinyllm_mcore.inference.rollout import SAMPLING_BLOCK, _sample

    torch.manual_seed(0)
    rows, vocab = 20000, SAMPLING_BLOCK + 44
    logits = (torch.randn(1, vocab) * 2).expand(rows, vocab)
    params = SamplingParams(temperature=0.8, top_k=40)
    seen = torch.zeros(rows, 1, dtype=torch.long)
    uniforms = torch.rand(rows, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    produced = torch.full((rows,), 1)  # each row's second uniform
    tokens = _sample(logits, seen, params, uniforms, produced)
    probs = process_logits(logits[:1], seen[:1], params).softmax(-1)[0]
    assert (probs[:SAMPLING_BLOCK] > 0).any() and (probs[SAMPLING_BLOCK:] > 0).any()  # kept tokens in both blocks
    cdf = probs.double().cumsum(0)
    assert torch.equal(tokens, torch.searchsorted(cdf, uniforms[:, 1].contiguous() * cdf[-1], right=True))
    frequencies = torch.bincount(tokens, minlength=vocab).double() / rows
    assert torch.all(frequencies[probs == 0] == 0) and (probs > 0).sum() == 40
    bound = 4 * (probs.double() * (1 - probs.double()) / rows).sqrt()
    assert torch.all((frequencies - probs.double()).abs() <= bound)
    # the edges: u = 0 takes the first token with positive probability, u just under 1 the last one
    edges = torch.tensor([[0.0], [1 - 2 ** -53]], dtype=torch.float64)
    picked = _sample(logits[:2], seen[:2], params, edges, torch.zeros(2, dtype=torch.long)).tolist()
    kept = torch.nonzero(probs > 0).flatten().tolist()
    assert picked == [kept[0], kept[-1]]
