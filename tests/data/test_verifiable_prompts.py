"""Verifiable prompts (data/verifiable_prompts.py) on real reasoning-gym items and real files: splits are deterministic
(across processes and hash seeds too: every rank must draw the same prompts) and disjoint, the scorers are the
task's own / exact match / math-verify, the reward table adds its terms, and bad input is one `error:` line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinyllm_mcore.cli.errors import run_cli
from tinyllm_mcore.data.verifiable_prompts import (PromptFile, TaskSource, chat_messages, final_answer,
                                                   has_answer_format, last_integer_correct, prompt_ids, reward_table)

REPO = Path(__file__).resolve().parents[2]
SMALL_CHAIN_SUM = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}  # 200 distinct questions


def one_error_line(fn, capsys, *fragments) -> str:
    """``fn`` fails the project's way: run_cli turns it into exit 2 and exactly one `error:` line on stderr."""
    capsys.readouterr()
    assert run_cli(fn) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------
# reasoning-gym tasks


def test_task_items_are_deterministic_and_seeded():
    a, b = (TaskSource("chain_sum", seed=7, heldout_size=20) for _ in range(2))
    assert a.heldout == b.heldout and [a.train_item(i) for i in range(50)] == [b.train_item(i) for i in range(50)]
    other = TaskSource("chain_sum", seed=8, heldout_size=20)
    assert [item.question for item in other.heldout] != [item.question for item in a.heldout]


def test_task_items_are_the_same_in_every_process(tmp_path):
    """Ranks build their sources independently: the items must not depend on the process (hash seed, import order)."""
    script = ("import json; from tinyllm_mcore.data.verifiable_prompts import TaskSource\n"
              "out = {}\n"
              "for name in ('chain_sum', 'basic_arithmetic', 'countdown'):\n"
              "    s = TaskSource(name, seed=11, heldout_size=5)\n"
              "    out[name] = [[i.question, i.answer] for i in s.heldout + [s.train_item(k) for k in range(5)]]\n"
              "print(json.dumps(out))\n")
    runs = [subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONHASHSEED": seed}) for seed in ("1", "2")]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    first, second = (json.loads(r.stdout) for r in runs)
    assert first == second and all(len(items) == 10 for items in first.values())


def test_training_never_sees_a_heldout_question():
    source = TaskSource("chain_sum", seed=3, heldout_size=100, config=SMALL_CHAIN_SUM)
    held = [item.question for item in source.heldout]
    assert len(set(held)) == 100  # the held-out set is distinct questions
    trained = {source.train_item(i).question for i in range(3000)}
    assert not trained & set(held)
    assert len(trained) == 100  # and training reaches every other question of the task


def test_a_task_too_small_for_its_heldout_set_is_one_error_line(capsys):
    tiny = {"min_terms": 1, "max_terms": 1, "min_digits": 1, "max_digits": 1}  # only 10 questions
    one_error_line(lambda: TaskSource("chain_sum", heldout_size=11, config=tiny), capsys,
                   "--task chain_sum", "fewer than 11 distinct questions")
    every_question_held = TaskSource("chain_sum", heldout_size=10, config=tiny)
    one_error_line(lambda: every_question_held.train_item(0), capsys, "--task chain_sum", "held-out questions")


def test_unknown_task_and_bad_config_are_one_error_line(capsys):
    line = one_error_line(lambda: TaskSource("chain-sum"), capsys, "--task chain-sum", "chain_sum")
    assert "not a reasoning-gym task" in line
    line = one_error_line(lambda: TaskSource("no_such_task"), capsys, "--task no_such_task")
    assert "chain_sum" in line and "basic_arithmetic" in line
    one_error_line(lambda: TaskSource("chain_sum", config={"max_term": 3}), capsys, "max_term", "max_terms")
    one_error_line(lambda: TaskSource("chain_sum", config={"min_terms": 3, "max_terms": 2}), capsys,
                   "invalid config", "max_terms must be >= min_terms")
    one_error_line(lambda: TaskSource("chain_sum", config={"seed": 1}), capsys, "seed", "come from the run")


@pytest.mark.parametrize("task", ["chain_sum", "basic_arithmetic"])
def test_arithmetic_tasks_are_scored_by_reasoning_gym(task):
    source = TaskSource(task, seed=5, heldout_size=10)
    table = reward_table(source)
    for item in source.heldout:
        assert table.score(f"计算一下。\n<answer>{item.answer}</answer>", item).accurate
        assert table.score(item.answer, item).terms["correct"] == 1.0  # no tag: the last line is the answer
        wrong = str(int(float(item.answer)) + 1)
        assert table.score(f"<answer>{wrong}</answer>", item).total == 0.0
        assert table.score("", item).total == 0.0


def test_countdown_is_scored_by_its_own_checker():
    source = TaskSource("countdown", seed=5, heldout_size=3)
    for item in source.heldout:
        numbers = item.entry["metadata"]["numbers"]
        assert source.correctness(item.answer, item) == 1.0  # the generator's own expression
        assert source.correctness(" + ".join(map(str, numbers[:-1])), item) == 0.05  # not all numbers used
        assert source.correctness("no idea", item) == 0.01  # countdown's floor reward
        assert not reward_table(source).score("no idea", item).accurate


def test_format_term_and_table_weights():
    source = TaskSource("chain_sum", seed=2, heldout_size=1)
    item = source.heldout[0]
    table = reward_table(source, format_weight=0.25)
    assert [term.name for term in table.terms] == ["correct", "format"] and len(table.describe()) == 2
    right = table.score(f"想一想\n<answer>{item.answer}</answer>\n", item)
    assert right.terms == {"correct": 1.0, "format": 1.0} and right.total == 1.25
    untagged = table.score(item.answer, item)
    assert untagged.terms == {"correct": 1.0, "format": 0.0} and untagged.total == 1.0
    assert [term.name for term in reward_table(source).terms] == ["correct"]
    with pytest.raises(ValueError, match="--format-reward"):
        reward_table(source, format_weight=-1.0)


def test_answer_extraction_and_format_rule():
    assert final_answer("a <answer>1</answer> b <answer> 2 </answer>") == "2"
    assert final_answer("思考\n\n  42  \n") == "42" and final_answer("  \n") is None
    assert has_answer_format("reasoning <answer>7</answer>  \n")
    assert not has_answer_format("<answer>7</answer> and more")
    assert not has_answer_format("<answer> </answer>")
    assert not has_answer_format("<answer>1</answer><answer>7</answer>")
    assert not has_answer_format("7")


def test_heldout_rule_is_the_last_integer():
    assert last_integer_correct("3 + 4 = 7", 7)
    assert last_integer_correct("答案是 -12。", "-12")
    assert last_integer_correct("12-5=7", 7)  # a minus right after a digit is an operator
    assert not last_integer_correct("7, no wait, 8", 7)
    assert not last_integer_correct("seven", 7)


# ---------------------------------------------------------------------------------------------------------------
# --prompts files


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_prompt_file_split_is_seeded_disjoint_and_cycles_by_epoch(tmp_path):
    records = [json.dumps({"prompt": f"问题 {i}", "answer": str(i)}, ensure_ascii=False) for i in range(20)]
    records.append(json.dumps({"prompt": "问题 3", "answer": "3"}, ensure_ascii=False))  # a duplicate prompt
    path = write_lines(tmp_path / "p.jsonl", records[:10] + [""] + records[10:])  # a blank line is skipped
    source = PromptFile(path, seed=1, heldout_size=5)
    again = PromptFile(path, seed=1, heldout_size=5)
    assert source.heldout == again.heldout and len(source.heldout) == 5
    held = {item.question for item in source.heldout}
    epoch0 = [source.train_item(i) for i in range(len(source.train))]
    epoch1 = [source.train_item(len(source.train) + i) for i in range(len(source.train))]
    assert not held & {item.question for item in source.train}  # the duplicate goes wherever its twin is
    def line(item):
        return int(item.origin.rsplit(":", 1)[1])

    assert sorted(epoch0, key=line) == sorted(epoch1, key=line) == source.train  # each epoch: every item once
    assert epoch0 != epoch1  # reshuffled each epoch
    assert [again.train_item(i) for i in reversed(range(40))] == [source.train_item(i) for i in reversed(range(40))]
    assert source.heldout[0].origin.startswith(f"{path}:")


def test_exact_and_math_verify_scorers(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [json.dumps({"prompt": "1/2 = ?", "answer": "\\frac{1}{2}"}),
                                              json.dumps({"prompt": "6 * 7", "answer": 42})])
    exact, verified = PromptFile(path, scorer="exact"), PromptFile(path, scorer="math-verify")
    half, answer = exact.train  # nothing held out: the file's order
    assert answer.answer == "42"  # a JSON number is its text
    assert exact.correctness("42", answer) == 1.0 and exact.correctness("42.0", answer) == 0.0
    assert exact.correctness(" \\frac{1}{2} ", half) == 1.0 and exact.correctness("0.5", half) == 0.0
    assert verified.correctness("0.5", half) == 1.0 and verified.correctness("$\\frac{2}{4}$", half) == 1.0
    assert verified.correctness("42.0", answer) == 1.0 and verified.correctness("43", answer) == 0.0
    assert verified.correctness(None, answer) == 0.0
    assert reward_table(verified).score("so the answer is\n<answer>0.5</answer>", half).accurate
    with pytest.raises(ValueError, match="scorer"):
        PromptFile(path, scorer="fuzzy")


@pytest.mark.parametrize("lines,fragments", [
    ([], ["no prompts", "empty"]),
    (["", "  "], ["no prompts"]),
    (['{"prompt": "a", "answer": "1"}', '{"prompt": "b", "answer": '], [":2:", "not a JSON object"]),
    (['{"prompt": "a", "answer": "1"}', '["a", "1"]'], [":2:", "expected a JSON object"]),
    (['{"prompt": "a", "answer": "1"}', '', '{"question": "b", "answer": "2"}'], [":3:", "missing key 'prompt'"]),
    (['{"prompt": "a"}'], [":1:", "missing key 'answer'"]),
    (['{"prompt": "", "answer": "1"}'], [":1:", "\"prompt\" must be"]),
    (['{"prompt": "a", "answer": null}'], [":1:", "\"answer\" must be"]),
    (['{"prompt": "a", "answer": true}'], [":1:", "\"answer\" must be"]),
])
def test_bad_prompt_files_are_one_error_line_naming_file_and_line(tmp_path, capsys, lines, fragments):
    path = write_lines(tmp_path / "bad.jsonl", lines)
    one_error_line(lambda: PromptFile(path), capsys, str(path), *fragments)


def test_unreadable_prompt_files_are_one_error_line(tmp_path, capsys):
    one_error_line(lambda: PromptFile(tmp_path / "missing.jsonl"), capsys, "missing.jsonl", "no such file")
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "2"}\n')
    one_error_line(lambda: PromptFile(path), capsys, f"{path}:2", "UTF-8")
    good = write_lines(tmp_path / "two.jsonl", ['{"prompt": "a", "answer": "1"}', '{"prompt": "b", "answer": "2"}'])
    one_error_line(lambda: PromptFile(good, heldout_size=2), capsys, str(good), "hold out 2 of its 2")


# ---------------------------------------------------------------------------------------------------------------
# The prompt a model sees


def test_prompt_ids_are_the_chat_template_of_the_exported_folder():
    """The rollout prompt (our encoder) is what transformers' apply_chat_template gives for the same question, so a
    held-out evaluation of the HF export asks exactly what GRPO trained on."""
    from transformers import AutoTokenizer

    from tests.harness.text_data import tiny_tokenizer, tiny_tokenizer_dir

    tokenizer = tiny_tokenizer()
    hf = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir()))
    for item in TaskSource("chain_sum", seed=4, heldout_size=3).heldout:
        ids = prompt_ids(tokenizer, item)
        assert ids[-len(tokenizer.generation_prompt_ids()):] == tokenizer.generation_prompt_ids()
        templated = hf.apply_chat_template(chat_messages(item.question), add_generation_prompt=True, tokenize=True)
        assert ids == list(templated["input_ids"] if hasattr(templated, "keys") else templated)
