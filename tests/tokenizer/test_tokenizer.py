"""The Tokenizer: the seed's ChatGLM3 and 49958 tokenizers, our trained ones, the chat format."""
import json
import pickle
import shutil

import pytest

from tests.harness.text_data import tiny_tokenizer
from tinyllm_mcore.tokenizer.core import DEFAULT_SYSTEM, ROLE_TOKENS, Tokenizer


@pytest.fixture(scope="module")
def chatglm3(chatglm3_tokenizer_model):
    return Tokenizer.load(chatglm3_tokenizer_model)


def test_chatglm3_special_tokens_are_the_seeds(chatglm3):
    assert chatglm3.kind == "chatglm3"
    assert chatglm3.vocab_size == 64798
    assert (chatglm3.eos, chatglm3.eod, chatglm3.pad, chatglm3.bos) == (2, 2, 0, 1)
    seed_order = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
                  "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
    assert [chatglm3.token_to_id(t) for t in seed_order] == list(range(64789, 64798))
    assert [chatglm3.id_to_token(i) for i in range(64789, 64798)] == seed_order


def test_chatglm3_chat_prompt_reproduces_seed_ids(chatglm3):
    # Ids the seed's ChatGLMTokenizer (tokenizer_config.json knows <|user|>, <|assistant|> as added tokens) gave for
    # "\n".join(["<|system|>", sys, "<|user|>", "介绍一下中国。", "<|assistant|>"]) + "\n", captured by running it.
    seed_user_part = [64795, 30910, 13, 48875, 31626, 31155, 13]
    seed_assistant_part = [64796, 30910, 13]
    seed_prefix = [64790, 64792]  # [gMASK] sop, from add_special_tokens=True
    # The seed split <|system|> into text pieces (906, 31007, 13361, 31007, 30994); we use its single id 64794,
    # followed by the seed's ids for "\n你是由wdndev开发的个人助手。\n" as a chunk of its own.
    fixed_system_part = [64794, 30910, 13, 54622, 33702, 17953, 30916, 8239, 43809, 31745, 42481, 31155, 13]

    ids = chatglm3.chat_prompt_ids([{"role": "user", "content": "介绍一下中国。"}])
    assert ids == seed_prefix + fixed_system_part + seed_user_part + seed_assistant_part
    assert chatglm3.detokenize(ids) == "[gMASK]sop<|system|>\n" + DEFAULT_SYSTEM + "\n<|user|>\n介绍一下中国。\n<|assistant|>\n"


def test_role_markers_are_single_ids_and_plain_text_stays_text(chatglm3):
    ids = chatglm3.chat_prompt_ids([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                                    {"role": "observation", "content": "z"}], system="s")
    for role in ROLE_TOKENS:
        assert ids.count(chatglm3.token_to_id(role)) == (2 if role == "<|assistant|>" else 1)
    # A literal marker inside a pretraining document is not turned into the special id.
    text_ids = chatglm3.tokenize("看<|user|>看")
    assert not set(text_ids) & set(chatglm3.special_tokens.values())
    assert chatglm3.detokenize(text_ids) == "看<|user|>看"


def test_answer_is_trained_segment_with_eos_and_multi_turn(chatglm3):
    messages = [{"role": "system", "content": "你是助手。"},
                {"role": "user", "content": "一"}, {"role": "assistant", "content": "二"},
                {"role": "user", "content": "三"}, {"role": "assistant", "content": " 四 "}]
    segments = chatglm3.encode_conversation(messages)
    assert len(segments) == 4
    prompt1, answer1, prompt2, answer2 = segments
    assert answer1 == chatglm3.tokenize("二") + [2] and answer2 == chatglm3.tokenize("四") + [2]
    assert prompt2[0] == chatglm3.token_to_id("<|user|>") and prompt2[-3] == chatglm3.token_to_id("<|assistant|>")
    # Each chunk is encoded on its own (as the seed did), so an answer starts with SentencePiece's dummy-prefix
    # space: decoding the answer alone gives the text back; decoding the whole sequence shows that space.
    assert chatglm3.detokenize(answer2) == "四"
    text = chatglm3.detokenize([i for s in segments for i in s])
    assert text == "[gMASK]sop<|system|>\n你是助手。\n<|user|>\n一\n<|assistant|>\n 二<|user|>\n三\n<|assistant|>\n 四"
    with pytest.raises(ValueError, match="role"):
        chatglm3.encode_conversation([{"role": "robot", "content": "x"}])


def test_seed_49958_tokenizer_with_added_tokens(shared_dir):
    tok = Tokenizer.load(shared_dir / "tokenizers" / "tinyllm_49958")
    added = json.loads((shared_dir / "tokenizers" / "tinyllm_49958" / "added_tokens.json").read_text())
    assert tok.kind == "added_tokens" and tok.vocab_size == 49958
    assert all(tok.token_to_id(t) == i for t, i in added.items())
    ids = tok.chat_prompt_ids([{"role": "user", "content": "你好"}])
    assert ids[:2] == [1, added["<|system|>"]] and added["<|user|>"] in ids and added["<|assistant|>"] in ids


def test_unknown_sentencepiece_model_needs_explicit_type(shared_dir, tmp_path):
    shutil.copy(shared_dir / "tokenizers" / "tinyllm_49958" / "tokenizer.model", tmp_path / "tokenizer.model")
    with pytest.raises(ValueError, match="--tokenizer-type"):
        Tokenizer.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer.load(tmp_path / "nowhere")


def test_trained_tokenizer_round_trip_pickle_and_identifiers():
    tok = tiny_tokenizer()
    assert tok.kind == "sentencepiece"
    text = "天下 hello 2024。\n人民"
    assert tok.detokenize(tok.tokenize(text)) == text
    clone = pickle.loads(pickle.dumps(tok))  # DataLoader workers receive it pickled
    assert clone.tokenize(text) == tok.tokenize(text) and clone.special_tokens == tok.special_tokens
    json.dumps(tok.unique_identifiers)  # megatron-core json-dumps it into its cache key
