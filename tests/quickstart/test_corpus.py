"""The synthetic knowledge corpus: deterministic, held-out phrasings disjoint, DPO rejections plausible and wrong."""
import json

import pytest

from tinyllm_mcore.quickstart.corpus import RELATIONS, build_corpus, exact_match


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(seed=7)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = build_corpus(seed=7).write(tmp_path / "a")
    b = build_corpus(seed=7).write(tmp_path / "b")
    c = build_corpus(seed=8).write(tmp_path / "c")
    for name in ("pretrain", "sft", "dpo", "eval", "tokenizer", "facts"):
        assert a[name].read_bytes() == b[name].read_bytes(), name
    assert a["pretrain"].read_bytes() != c["pretrain"].read_bytes()
    first = json.loads(a["sft"].read_text(encoding="utf-8").splitlines()[0])
    assert set(first) == {"question", "answer"}


def test_world_is_consistent(corpus):
    names = [c.name for c in corpus.countries]
    assert len(set(names)) == len(names) == 24
    for relation in ("capital", "river", "animal", "currency", "language"):  # one-to-one relations
        values = [c.value(relation) for c in corpus.countries]
        assert len(set(values)) == len(values), relation
    # every fact is stated in pretraining, in more than one sentence pattern
    text = "\n".join(d["text"] for d in corpus.pretrain)
    for c in corpus.countries:
        for relation, value in c.facts:
            assert value in text and c.name in text
    assert len(corpus.pretrain) >= 24 * 40


def test_heldout_phrasings_are_disjoint_from_training(corpus):
    train_templates = {q for r in RELATIONS for q in r.train_questions}
    heldout_templates = {q for r in RELATIONS for q in r.heldout_questions}
    assert not train_templates & heldout_templates
    sft_questions = {r["question"] for r in corpus.sft}
    dpo_prompts = {r["prompt"] for r in corpus.preference}
    eval_questions = {r["question"] for r in corpus.eval}
    assert not eval_questions & (sft_questions | dpo_prompts)
    # no held-out question appears verbatim inside any training text either
    training_text = "\n".join([d["text"] for d in corpus.pretrain] + list(sft_questions | dpo_prompts))
    assert not [q for q in eval_questions if q in training_text]


def test_sft_and_eval_answers_agree_and_unseen_countries_have_no_sft(corpus):
    answers = {}
    for r in corpus.sft:
        answers.setdefault(r["answer"], 0)
        answers[r["answer"]] += 1
    seen = [r for r in corpus.eval if r["split"] == "heldout_phrasing"]
    unseen = [r for r in corpus.eval if r["split"] == "unseen_fact"]
    assert len(seen) == 20 * 6 * 2 and len(unseen) == 4 * 6 * 2
    for r in seen:
        assert answers.get(r["answer"]) == 6  # the reference is exactly the SFT target, once per training phrasing
    sft_text = "\n".join(r["question"] + r["answer"] for r in corpus.sft + [
        {"question": p["prompt"], "answer": p["chosen"] + p["rejected"]} for p in corpus.preference])
    for name in corpus.unseen:
        assert name not in sft_text


def test_dpo_rejected_is_plausible_and_wrong(corpus):
    facts = {c.name: dict(c.facts) for c in corpus.countries}
    by_relation = {rel: {f[rel] for f in facts.values()} for rel in facts[corpus.countries[0].name]}
    assert len(corpus.preference) == 20 * 6 * 2
    for pair in corpus.preference:
        assert pair["chosen"] != pair["rejected"]
        country = next(n for n in facts if pair["prompt"].startswith(n) or n in pair["prompt"])
        relation = next(r for r in RELATIONS if any(q.format(e=country) == pair["prompt"] for q in r.train_questions))
        correct = facts[country][relation.name]
        assert pair["chosen"] == relation.answer.format(e=country, v=correct)
        # rejected: the same answer sentence with another real value of the same relation
        wrong = [v for v in by_relation[relation.name] - {correct}
                 if relation.answer.format(e=country, v=v) == pair["rejected"]]
        assert len(wrong) == 1


def test_exact_match_ignores_whitespace_only():
    assert exact_match(" 安宁国的首都是青澜城。\n", "安宁国的首都是青澜城。")
    assert not exact_match("安宁国的首都是青澜城", "安宁国的首都是青澜城。")


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError):
        build_corpus(num_countries=1)
    with pytest.raises(ValueError):
        build_corpus(num_countries=5, num_unseen=5)
