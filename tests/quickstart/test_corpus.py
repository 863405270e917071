"""The synthetic knowledge corpus: deterministic, held-out phrasings disjoint, both answer styles equally often in SFT,
DPO pairs that prefer the full sentence and the correct fact, held-out pairs, style-aware scoring."""
import json

import pytest

from tinyllm_mcore.quickstart.corpus import (RELATIONS, bare_answer, build_corpus, exact_match, fact_correct,
                                             fact_value, preferred_style)


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(seed=7)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = build_corpus(seed=7).write(tmp_path / "a")
    b = build_corpus(seed=7).write(tmp_path / "b")
    c = build_corpus(seed=8).write(tmp_path / "c")
    for name in ("pretrain", "sft", "dpo", "eval", "eval_pairs", "tokenizer", "facts"):
        assert a[name].read_bytes() == b[name].read_bytes(), name
    assert a["pretrain"].read_bytes() != c["pretrain"].read_bytes()
    first = json.loads(a["sft"].read_text(encoding="utf-8").splitlines()[0])
    assert set(first) == {"question", "answer"}
    first = json.loads(a["eval"].read_text(encoding="utf-8").splitlines()[0])
    assert set(first) == {"question", "answer", "entity", "relation", "split"}


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


def test_sft_answers_every_question_in_both_styles_and_only_seen_countries(corpus):
    facts = {c.name: dict(c.facts) for c in corpus.countries}
    answers_by_question: dict[str, list[str]] = {}
    for r in corpus.sft:
        answers_by_question.setdefault(r["question"], []).append(r["answer"])
    assert len(corpus.sft) == 20 * 6 * 6 * 2
    for question, answers in answers_by_question.items():
        country = next(n for n in facts if question.startswith(n))
        relation = next(r for r in RELATIONS if any(q.format(e=country) == question for q in r.train_questions))
        value = facts[country][relation.name]
        assert sorted(answers) == sorted([relation.answer.format(e=country, v=value), bare_answer(value)]), question
    by_split = {s: [r for r in corpus.eval if r["split"] == s]
                for s in ("heldout_phrasing", "no_preference_fact", "unseen_fact")}
    assert [len(v) for v in by_split.values()] == [16 * 6 * 2, 4 * 6 * 2, 4 * 6 * 2]
    sft_answers = {r["answer"] for r in corpus.sft}
    for r in by_split["heldout_phrasing"] + by_split["no_preference_fact"]:
        assert r["answer"] in sft_answers  # the reference is the full-sentence SFT target
    sft_text = "\n".join(r["question"] + r["answer"] for r in corpus.sft)
    dpo_text = "\n".join(p["prompt"] + p["chosen"] + p["rejected"] for p in corpus.preference)
    for name in corpus.unseen:
        assert name not in sft_text and name not in dpo_text
    for name in corpus.no_preference:
        assert name in sft_text and name not in dpo_text
    assert {r["entity"] for r in by_split["unseen_fact"]} == set(corpus.unseen)
    assert {r["entity"] for r in by_split["no_preference_fact"]} == set(corpus.no_preference)


def test_dpo_pairs_prefer_the_full_sentence_and_the_correct_fact(corpus):
    facts = {c.name: dict(c.facts) for c in corpus.countries}
    by_relation = {rel: {f[rel] for f in facts.values()} for rel in facts[corpus.countries[0].name]}
    assert len(corpus.preference) == 16 * 6 * 4
    kinds = {"style": 0, "fact": 0}
    for pair in corpus.preference:
        country = next(n for n in facts if pair["prompt"].startswith(n))
        relation = next(r for r in RELATIONS if any(q.format(e=country) == pair["prompt"] for q in r.train_questions))
        correct = facts[country][relation.name]
        assert pair["chosen"] == relation.answer.format(e=country, v=correct)
        if pair["rejected"] == bare_answer(correct):  # style: same fact, bare value
            kinds["style"] += 1
            continue
        # fact: the same answer sentence with another real value of the same relation
        wrong = [v for v in by_relation[relation.name] - {correct}
                 if relation.answer.format(e=country, v=v) == pair["rejected"]]
        assert len(wrong) == 1
        kinds["fact"] += 1
    assert kinds == {"style": 16 * 6 * 2, "fact": 16 * 6 * 2}


def test_heldout_pairs_follow_the_eval_questions(corpus):
    templates = {r.name: r.answer for r in RELATIONS}
    assert len(corpus.eval_pairs) == 2 * len(corpus.eval)
    for record, style, fact in zip(corpus.eval, corpus.eval_pairs[::2], corpus.eval_pairs[1::2]):
        value = fact_value(record)
        assert record["answer"] == templates[record["relation"]].format(e=record["entity"], v=value)
        assert style == {"prompt": record["question"], "chosen": record["answer"], "rejected": bare_answer(value),
                         "kind": "style", "split": record["split"]}
        assert fact["kind"] == "fact" and fact["chosen"] == record["answer"] and fact["split"] == record["split"]
        assert fact["rejected"] != record["answer"] and fact["rejected"].startswith(record["entity"])


def test_style_aware_scoring():
    record = {"answer": "安宁国的首都是青澜城。", "entity": "安宁国", "relation": "capital"}
    assert fact_value(record) == "青澜城"
    assert fact_correct(" 安宁国的首都是青澜城。\n", record) and preferred_style("安宁国的首都是青澜城。", record)
    assert fact_correct("青澜城。", record) and not preferred_style("青澜城。", record)
    assert not fact_correct("安宁国的首都是明岚城。", record) and preferred_style("安宁国的首都是明岚城。", record)
    assert not fact_correct("青澜城", record) and not fact_correct("安宁国的首都是青澜城。青澜城。", record)
    with pytest.raises(ValueError):
        fact_value({**record, "answer": "青澜城。"})


def test_exact_match_ignores_whitespace_only():
    assert exact_match(" 安宁国的首都是青澜城。\n", "安宁国的首都是青澜城。")
    assert not exact_match("安宁国的首都是青澜城", "安宁国的首都是青澜城。")


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError):
        build_corpus(num_countries=1)
    with pytest.raises(ValueError):
        build_corpus(num_countries=5, num_unseen=5)
    with pytest.raises(ValueError):
        build_corpus(num_countries=5, num_unseen=2, num_no_preference=3)
