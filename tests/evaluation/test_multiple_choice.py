"""Multiple choice: a constructed task whose right answers are known, shuffled labels, malformed rows, answer parsing,
category averages."""
import random

import pytest
import torch

from tests.harness.cmmlu import make_tiny_hf_model, random_questions, write_cmmlu_csv
from tinyllm_mcore.evaluation import data, multiple_choice as mc, subjects
from tinyllm_mcore.evaluation.backends import HFCausalLM
from tinyllm_mcore.evaluation.encoders import HFEncoder


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("hf") / "model")


@pytest.fixture(scope="module")
def model_and_encoder(hf_dir):
    return HFCausalLM.from_pretrained(str(hf_dir)), HFEncoder.from_pretrained(str(hf_dir))


def reference_logprob(model, ids_context, ids_continuation) -> float:
    """Straightforward: one unbatched forward of context + continuation, full-vocab log-softmax everywhere."""
    ids = torch.tensor([ids_context + ids_continuation])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    start = len(ids_context)
    return sum(float(logp[start + j - 1, t]) for j, t in enumerate(ids_continuation))


def constructed_subject(tmp_path, model, encoder, n=32, shots=1, seed=3):
    """A CMMLU folder whose answers are the options the model scores highest (by the reference computation)."""
    test, dev = random_questions(n, seed), random_questions(5, seed + 1)
    dev_questions = [data.Question(str(i), q["Question"], tuple(q[l] for l in "ABCD"), q["Answer"])
                     for i, q in enumerate(dev)]
    reference_scores = []
    for i, q in enumerate(test):
        question = data.Question(str(i), q["Question"], tuple(q[l] for l in "ABCD"), "A")
        context = mc.ppl_context(subjects.chinese_name("agronomy", "cmmlu"), dev_questions[:shots], question)
        scores = []
        for letter in "ABCD":
            whole = encoder.encode(context + " " + letter)
            ctx = encoder.encode(context)
            scores.append(reference_logprob(model, ctx, whole[len(ctx):]))
        q["Answer"] = "ABCD"[max(range(4), key=lambda j: scores[j])]
        reference_scores.append(scores)
    root = tmp_path / "cmmlu"
    write_cmmlu_csv(root / "test" / "agronomy.csv", test)
    write_cmmlu_csv(root / "dev" / "agronomy.csv", dev)
    return root, test, reference_scores


def test_known_best_options_score_100_and_shuffled_labels_drop_to_chance(tmp_path, model_and_encoder):
    lm, encoder = model_and_encoder
    root, test, reference_scores = constructed_subject(tmp_path, lm.model, encoder)
    tasks = mc.load_tasks(root, "test", shots=1)
    result = mc.evaluate_multiple_choice(lm, encoder, tasks, batch_size=7, max_batch_tokens=2000)
    assert result["subjects"]["agronomy"]["questions"] == 32
    assert result["average"] == 1.0
    for record, ref in zip(result["records"]["agronomy"], reference_scores):  # batched == one-at-a-time
        assert record["scores"] == pytest.approx(ref, abs=1e-4)
    # the answers are not all one letter (else "100%" would say little)
    assert len({q["Answer"] for q in test}) >= 3

    rng = random.Random(1)
    shuffled = [rng.choice("ABCD") for _ in test]  # labels unrelated to the model
    for q, label in zip(test, shuffled):
        q["Answer"] = label
    write_cmmlu_csv(root / "test" / "agronomy.csv", test)
    result = mc.evaluate_multiple_choice(lm, encoder, mc.load_tasks(root, "test", shots=1), batch_size=16)
    best = ["ABCD"[max(range(4), key=lambda j: s[j])] for s in reference_scores]
    expected = sum(b == label for b, label in zip(best, shuffled)) / len(test)
    assert result["average"] == pytest.approx(expected)
    assert 0.1 <= result["average"] <= 0.45  # chance is 0.25


def test_shared_prefix_cache_gives_the_same_scores_with_fewer_tokens(model_and_encoder):
    """Two "subjects" whose questions share a long prefix (as k-shot prompts share header and shots): each prefix
    runs once (KV cache), not once per row, and the scores do not change."""
    lm, _ = model_and_encoder
    rng = random.Random(5)
    pairs = []
    for _ in range(2):
        prefix = [rng.randrange(3, 1000) for _ in range(120)]
        for _ in range(9):
            context = prefix + [rng.randrange(3, 1000) for _ in range(rng.randint(5, 60))]
            pairs += [(context, [t]) for t in (10, 11, 12, 13)]
    shared_stats, plain_stats = mc.ScoreStats(), mc.ScoreStats()
    shared = mc.score_continuations(lm, pairs, batch_size=4, stats=shared_stats)
    plain = mc.score_continuations(lm, pairs, batch_size=4, share_prefix=False, stats=plain_stats)
    assert shared == pytest.approx(plain, abs=1e-4)
    assert shared_stats.rows == plain_stats.rows == 18 and shared_stats.truncated == 0
    assert shared_stats.tokens < plain_stats.tokens / 2


def test_score_continuations_multi_token_options_match_reference(model_and_encoder):
    """Options that are whole texts (several tokens, different lengths, no shared rows), mixed with rows longer than
    the model (left-truncated)."""
    lm, encoder = model_and_encoder
    rng = random.Random(4)
    from tests.harness.text_data import random_text

    pairs = []
    for _ in range(12):
        context = encoder.encode(random_text(rng, 5, 40))
        for _ in range(3):
            pairs.append((context, encoder.encode_plain(random_text(rng, 1, 10))))
    long_context = encoder.encode(random_text(rng, 400, 500))
    assert len(long_context) > lm.max_length
    pairs.append((long_context, encoder.encode_plain("中国")))
    stats = mc.ScoreStats()
    scores = mc.score_continuations(lm, pairs, batch_size=5, stats=stats)
    assert stats.truncated == 1
    for (context, continuation), score in zip(pairs[:-1], scores[:-1]):
        assert score == pytest.approx(reference_logprob(lm.model, list(context), list(continuation)), abs=1e-4)
    kept = (list(long_context) + list(pairs[-1][1]))[-(lm.max_length + 1):]
    n = len(pairs[-1][1])
    assert scores[-1] == pytest.approx(reference_logprob(lm.model, kept[:-n], kept[-n:]), abs=1e-4)


def test_single_token_options_share_one_forward(model_and_encoder):
    lm, _ = model_and_encoder
    context = [5, 6, 7, 8]
    stats = mc.ScoreStats()
    scores = mc.score_continuations(lm, [(context, [t]) for t in (10, 11, 12, 13)], stats=stats)
    assert stats.rows == 1 and stats.requests == 4
    ref = [reference_logprob(lm.model, context, [t]) for t in (10, 11, 12, 13)]
    assert scores == pytest.approx(ref, abs=1e-5)


def test_malformed_rows_are_reported_and_skipped(tmp_path, model_and_encoder):
    lm, encoder = model_and_encoder
    good = random_questions(4, 9)
    path = write_cmmlu_csv(tmp_path / "cmmlu" / "test" / "arts.csv", good, extra_rows=[
        ["4", "缺一个选项", "甲", "", "丙", "丁", "A"],
        ["5", "答案不对", "甲", "乙", "丙", "丁", "E"],
        ["6", "短行", "甲", "乙"],
        ["7", "", "甲", "乙", "丙", "丁", "B"],
    ])
    read = data.read_questions(path)
    assert len(read.questions) == 4
    assert dict(read.skipped) == {"missing option": 1, "answer not in A-D": 1, "short row": 1, "empty question": 1}
    assert [line for line, _ in read.skipped_rows] == [6, 7, 8, 9]
    result = mc.evaluate_multiple_choice(lm, encoder, mc.load_tasks(tmp_path / "cmmlu", "test"))
    assert result["questions"] == 4 and result["skipped_rows"] == 4
    assert result["subjects"]["arts"]["skipped_rows"]["answer not in A-D"] == 1


def test_ceval_layout_and_header(tmp_path):
    folder = tmp_path / "ceval" / "val"
    folder.mkdir(parents=True)
    (folder / "computer_network_val.csv").write_text(
        "id,question,A,B,C,D,answer,explanation\n0,网络层协议是,IP,TCP,HTTP,FTP,A,解释\n1,坏行,甲,乙,丙,丁,F,\n",
        encoding="utf-8")
    assert data.detect_benchmark(tmp_path / "ceval") == "ceval"
    tasks = mc.load_tasks(tmp_path / "ceval", "val")
    assert tasks[0].subject == "computer_network" and tasks[0].name_zh == "计算机网络"
    assert tasks[0].data.questions[0] == data.Question("0", "网络层协议是", ("IP", "TCP", "HTTP", "FTP"), "A")
    assert dict(tasks[0].data.skipped) == {"answer not in A-D": 1}
    with pytest.raises(data.EvalDataError, match="dev split"):
        mc.load_tasks(tmp_path / "ceval", "val", shots=2)


def test_prompt_matches_the_cmmlu_template():
    q = data.Question("0", "1+1=?", ("1", "2", "3", "4"), "B")
    shot = data.Question("1", "2+2=?", ("4", "5", "6", "7"), "A")
    assert mc.ppl_context("大学数学", [shot], q) == (
        "以下是关于大学数学的单项选择题，请直接给出正确答案的选项。\n\n"
        "2+2=?\nA. 4\nB. 5\nC. 6\nD. 7\n答案： A\n\n"
        "1+1=?\nA. 1\nB. 2\nC. 3\nD. 4\n答案：")


@pytest.mark.parametrize("text,letter", [
    ("A", "A"), ("B. 北京", "B"), ("(C)", "C"), ("答案是D", "D"), ("答案：B。因为……", "B"), ("我认为答案为 C", "C"),
    ("故选A", "A"), ("选项B正确", "B"), ("正确答案是：D", "D"), ("Ｃ", "C"), ("这道题选择 D 项", "D"),
    ("不知道", None), ("A和B都对", None), ("Apple", None), ("", None),
])
def test_parse_choice(text, letter):
    assert mc.parse_choice(text) == letter


def test_cmmlu_categories_follow_the_official_table():
    assert len(subjects.CMMLU_SUBJECTS) == 67 and len(subjects.CEVAL_SUBJECTS) == 52
    counts = {c: sum(c in subjects.subject_categories(s, "cmmlu") for s in subjects.CMMLU_SUBJECTS)
              for c in subjects.CMMLU_CATEGORIES}
    assert counts == {"STEM": 17, "Humanities": 13, "Social Science": 22, "Other": 15, "China specific": 15}
    assert subjects.subject_categories("chinese_history", "cmmlu") == ["Humanities", "China specific"]
    assert subjects.subject_categories("law", "ceval") == ["Humanities"]


def test_summary_averages_subjects_then_categories():
    def task(name, n):
        return mc.SubjectTask(name, "cmmlu", data.SubjectFile(name, None, [None] * n))

    tasks = [task("anatomy", 2), task("genetics", 4), task("chinese_history", 1)]
    records = {"anatomy": [{"correct": True}, {"correct": False}],
               "genetics": [{"correct": True}] * 4, "chinese_history": [{"correct": False}]}
    result = mc.summarize(tasks, records, mode="ppl")
    assert result["categories"]["STEM"]["accuracy"] == pytest.approx(0.75)  # mean of 0.5 and 1.0
    assert result["categories"]["China specific"]["accuracy"] == 0.0
    assert result["average"] == pytest.approx(0.5)
    assert result["question_weighted_accuracy"] == pytest.approx(5 / 7)
    table = mc.markdown_table(result)
    assert "| genetics | 遗传学 | STEM | 4 | 0 | 100.00 |" in table and "**50.00**" in table


def test_greedy_generation_matches_transformers_generate(model_and_encoder):
    lm, encoder = model_and_encoder
    prompts = [encoder.chat_prompt_ids([{"role": "user", "content": text}]) for text in ("你好", "中国的首都是哪里？")]
    ours = lm.generate_greedy(prompts, 6, stop_ids=[encoder.eos_id])
    for prompt, out in zip(prompts, ours):
        with torch.no_grad():
            ref = lm.model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                    eos_token_id=encoder.eos_id, pad_token_id=0)[0, len(prompt):].tolist()
        if ref and ref[-1] == encoder.eos_id:
            ref = ref[:-1]
        assert out == ref


def test_gen_mode_parses_what_the_model_says(tmp_path, model_and_encoder):
    lm, encoder = model_and_encoder

    class Scripted:  # a "model" that answers with fixed texts, to exercise parsing and accounting
        max_length = 256

        def generate_greedy(self, prompts, max_new_tokens, stop_ids):
            return [encoder.encode_plain(t) for t in ["答案是B", "C", "我不知道"][: len(prompts)]]

    write_cmmlu_csv(tmp_path / "c" / "test" / "arts.csv", [dict(q, Answer=a) for q, a in
                                                           zip(random_questions(3, 1), "BAD")])
    result = mc.evaluate_multiple_choice(Scripted(), encoder, mc.load_tasks(tmp_path / "c", "test"), mode="gen",
                                         batch_size=8)
    recs = result["records"]["arts"]
    preds = sorted(r["pred"] or "-" for r in recs)
    assert preds == ["-", "B", "C"]
    assert result["subjects"]["arts"]["unparsed"] == 1
