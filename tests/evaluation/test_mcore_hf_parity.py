"""The same weights evaluated as an mcore checkpoint (TP1, TP2, PP2; gloo, 2 processes) and as its HF export make
identical per-question choices in ppl mode, with matching option scores."""
import pytest

LAYOUTS = ("tp1pp1", "tp2pp1", "tp1pp2")


@pytest.fixture(scope="module")
def runs(mcore_export):
    from tinyllm_mcore.evaluation.multiple_choice import evaluate_multiple_choice, load_tasks
    from tinyllm_mcore.evaluation.runner import open_hf

    lm, encoder = open_hf(str(mcore_export["hf"]))  # AutoModelForCausalLM + AutoTokenizer, as a user loads it
    result = evaluate_multiple_choice(lm, encoder, load_tasks(mcore_export["bench"], "test", mcore_export["shots"]),
                                      batch_size=5)
    hf = {"choices": {s: [r["pred"] for r in recs] for s, recs in result["records"].items()},
          "scores": {s: [r["scores"] for r in recs] for s, recs in result["records"].items()}}
    return mcore_export["mcore"], hf


def test_every_layout_and_the_hf_export_choose_the_same(runs):
    mcore, hf = runs
    assert sum(len(v) for v in hf["choices"].values()) == 30
    for layout in LAYOUTS:
        assert mcore[layout]["choices"] == hf["choices"], layout


def test_option_scores_agree(runs):
    mcore, hf = runs
    for layout in LAYOUTS:
        for subject, scores in hf["scores"].items():
            for ours, theirs in zip(mcore[layout]["scores"][subject], scores):
                assert ours == pytest.approx(theirs, abs=1e-4), (layout, subject)
    # the choices are not decided by noise: the best option leads the runner-up clearly on most questions
    gaps = []
    for scores in hf["scores"].values():
        for s in scores:
            top = sorted(s, reverse=True)
            gaps.append(top[0] - top[1])
    assert sorted(gaps)[len(gaps) // 4] > 1e-2
