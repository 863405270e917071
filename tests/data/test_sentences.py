"""--split-sentences: the Chinese splitter (terminators and their variants, closing quotes kept with their sentence,
line breaks, --keep-newlines) and the nltk path for other languages."""
import pickle

import pytest

from tinyllm_mcore.data.sentences import MAX_SPLIT_CHARS, SentenceSplitter, split_chinese, split_document


@pytest.mark.parametrize("text,sentences", [
    ("今天天气很好。我们去公园吧！你来吗？来；好的", ["今天天气很好。", "我们去公园吧！", "你来吗？", "来；", "好的"]),
    ("“你好！”他说。「走吧？」『好。』（完。）", ["“你好！”", "他说。", "「走吧？」", "『好。』", "（完。）"]),
    ("真的吗？！当然……然后呢。。。结束", ["真的吗？！", "当然……", "然后呢。。。", "结束"]),
    ("半角｡全角．结束", ["半角｡", "全角．", "结束"]),
    ("版本3.14很好. Hello world! OK? yes; a.com/x?y=1 不拆", ["版本3.14很好.", "Hello world!", "OK?", "yes;",
                                                             "a.com/x?y=1 不拆"]),
    ('他说"好."然后走了! 结束', ['他说"好."', "然后走了!", "结束"]),
    ("标题\n\n第一段第一句。第一段第二句\n  第二段", ["标题", "第一段第一句。", "第一段第二句", "第二段"]),
    ("", []),
    ("   \n  ", []),
])
def test_chinese_sentences(text, sentences):
    assert split_chinese(text) == sentences
    kept = split_chinese(text, keep_newlines=True)
    assert "".join(kept) == text  # nothing lost: the whitespace between sentences stays at their ends
    assert [s.strip() for s in kept if s.strip()] == sentences


def test_keep_newlines_attaches_whitespace_to_the_sentence_before():
    assert split_chinese("一。\n\n二！ 三", keep_newlines=True) == ["一。\n\n", "二！ ", "三"]
    assert split_chinese("  一。二", keep_newlines=True) == ["  一。", "二"]


def test_splitter_for_a_language_and_megatron_lm_s_million_character_cut():
    splitter = SentenceSplitter("chinese")
    assert pickle.loads(pickle.dumps(splitter)).split("一。二") == ["一。", "二"]
    assert SentenceSplitter("zh", keep_newlines=True).split("一。\n二") == ["一。\n", "二"]
    long = "字" * (MAX_SPLIT_CHARS + 5) + "。尾"
    assert [len(s) for s in split_document(splitter, long)] == [MAX_SPLIT_CHARS, 6, 1]


def test_other_languages_use_nltk_punkt_when_installed():
    try:
        from nltk.tokenize.punkt import PunktTokenizer
        PunktTokenizer("english")
    except (ImportError, LookupError, OSError):
        with pytest.raises(ValueError, match="punkt"):
            SentenceSplitter("english")
        return
    splitter = SentenceSplitter("english")
    assert splitter.split("Mr. Smith went home. He slept.") == ["Mr. Smith went home.", "He slept."]
    assert "".join(SentenceSplitter("english", True).split("One.\n\nTwo.")) == "One.\n\nTwo."
