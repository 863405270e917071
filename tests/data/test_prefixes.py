"""data.prefixes, the one parse and check of data prefixes: megatron's --data-path blend syntax, the .bin/.idx pair,
and the one `error:` line the stages print for a bad one (pretraining's --data-path, SFT's --sft-data)."""
import os
import subprocess
import sys

import pytest

from tests.harness.cli import one_error_line
from tests.harness.text_data import tiny_tokenizer, tiny_tokenizer_dir
from tinyllm_mcore.data.prefixes import check_prefix, checked_blend, is_prefix, parse_blend

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_prefix(path, suffixes=(".bin", ".idx")) -> str:
    for suffix in suffixes:
        open(f"{path}{suffix}", "wb").close()
    return str(path)


def test_blend_syntax_is_megatrons():
    from megatron.core.datasets.utils import get_blend_from_list

    for words in (["a"], ["a", "b", "c"], ["0.25", "a", "0.75", "b"], ["3", "a"]):
        assert parse_blend(words) == get_blend_from_list(words), words  # what GPTDatasetConfig's blend takes
    assert parse_blend(["30", "a", "70", "b"]) == (["a", "b"], [30.0, 70.0])
    assert parse_blend(["a", "b"]) == (["a", "b"], None)


@pytest.mark.parametrize("words,message", [
    ([], "--data-path: no data prefix given"),
    (None, "--data-path: no data prefix given"),
    (["0.3", "a", "b"], "--data-path 0.3 a b: a weighted blend is 'weight prefix' pairs, and 3 words are not pairs"),
    (["0.3", "a", "b", "c"], "--data-path: 'b' stands where the weight of 'c' belongs"),
    (["a", "0.5", "b"], "--data-path: '0.5' looks like a weight, but 'a' has none"),
    (["0", "a", "1", "b"], "--data-path: the weight of a is 0; weights must be positive numbers"),
    (["-1", "a"], "the weight of a is -1"),
    (["nan", "a"], "the weight of a is nan"),
    (["0.5", "0.5"], "--data-path: '0.5' stands where a prefix belongs (after the weight 0.5)"),
])
def test_a_bad_blend_is_one_message_naming_the_flag(words, message):
    with pytest.raises(ValueError) as raised:
        parse_blend(words)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_a_prefix_needs_its_bin_and_idx(tmp_path):
    good = make_prefix(tmp_path / "c_text_document")
    check_prefix(good, "--data-path")
    assert checked_blend(["2", good, "1", good]) == ([good, good], [2.0, 1.0])
    half = make_prefix(tmp_path / "half", (".bin",))
    with pytest.raises(FileNotFoundError, match=f"^--sft-data {half}: {half}.idx not found"):
        check_prefix(half, "--sft-data")
    # the first bad prefix of a blend is named, with both missing files
    missing = str(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match=f"^--data-path {missing}: {missing}.bin and .idx not found"):
        checked_blend(["1", good, "1", missing, "1", str(tmp_path / "other")])
    # preprocess_data's --output-prefix instead of the prefix it wrote
    with pytest.raises(FileNotFoundError, match=f"did you mean {good}\\?"):
        check_prefix(str(tmp_path / "c"), "--data-path")
    with pytest.raises(ValueError, match=f"give the prefix without .bin \\({good}\\)"):
        check_prefix(good + ".bin", "--data-path")


def test_a_prefix_is_told_from_a_jsonl_file_by_its_pair(tmp_path):
    assert is_prefix(make_prefix(tmp_path / "both"))
    assert is_prefix(make_prefix(tmp_path / "idx_only", (".idx",)))
    assert is_prefix(make_prefix(tmp_path / "bin_only", (".bin",)))
    (tmp_path / "chats.jsonl").write_text("{}\n")
    assert not is_prefix(str(tmp_path / "chats.jsonl")) and not is_prefix(str(tmp_path / "absent"))


def test_conversation_prefixes_are_checked_with_their_flag(tmp_path):
    from tinyllm_mcore.data.conversations import load_conversations

    bin_only = make_prefix(tmp_path / "p_preference_document", (".bin",))  # was read as a missing jsonl file
    with pytest.raises(FileNotFoundError, match=f"^--preference-data {bin_only}: {bin_only}.idx not found"):
        load_conversations(bin_only, tiny_tokenizer(), "preference")


def run_stage(stage, *argv):
    return subprocess.run([sys.executable, "-m", f"tinyllm_mcore.stages.{stage}", "--model-size", "tiny",
                           "--tokenizer-model", str(tiny_tokenizer_dir()), "--seq-length", "32",
                           "--micro-batch-size", "2", "--train-iters", "1", *argv],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_the_stages_print_one_error_line_naming_flag_and_file(tmp_path):
    good = make_prefix(tmp_path / "a_text_document")
    missing = str(tmp_path / "b_text_document")
    one_error_line(run_stage("pretrain", "--data-path", "0.5", good, "0.5", missing),
                   f"error: --data-path {missing}: {missing}.bin and .idx not found")
    one_error_line(run_stage("pretrain", "--data-path", good, "0.5"), "error: --data-path: '0.5' looks like a weight")
    idx_only = make_prefix(tmp_path / "s_sft_document", (".idx",))
    one_error_line(run_stage("sft", "--sft-data", idx_only), f"error: --sft-data {idx_only}: {idx_only}.bin not found")
