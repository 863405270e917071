"""A deterministic, seeded synthetic Chinese knowledge corpus: the quickstart's data, generated here (nothing
downloaded).

A fixed world of invented countries, each with six facts (capital, longest river, national animal, currency,
official language, continent). The same facts are written four ways:

* pretraining documents — declarative sentences in many patterns, shuffled into short encyclopedia-style passages;
* SFT question/answer pairs — *training* phrasings only, every question answered twice, once in each of two styles:
  the full sentence that starts with the entity (``雁翠国的首都是翠嘉城。``) and the bare value (``翠嘉城。``). SFT
  teaches the facts and leaves the style open (both equally likely);
* DPO pairs — a training-phrasing question with two kinds of pair: *style* (the full sentence over the bare value,
  same correct fact: the preference SFT left open) and *fact* (the full sentence over the same sentence naming
  another country's value: plausible, always wrong, so the facts stay anchored);
* evaluation questions — *held-out* phrasings that no other split uses, with the full-sentence reference answer;
  ``eval_pairs.jsonl`` holds a style pair and a fact pair for each of them (held-out preference pairs).

Three groups of countries, each an evaluation split: ``heldout_phrasing`` (facts in SFT and in preference pairs),
``no_preference_fact`` (facts in SFT, in no preference pair: does the learnt style carry over to them?) and
``unseen_fact`` (facts only in pretraining: did SFT teach the model to answer from what pretraining stored?).

The same seed always gives byte-identical files (``random.Random(seed)``, no set/dict-order dependence).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

# Characters invented names are drawn from (pleasant, unambiguous, no relation words such as 首/都/河).
_NAME_CHARS = ("安宁青澜明岚泽云松星林月川雪华丰瑞祥禾田金玉银石兰竹梅桐清远平和嘉诺丹琪瑶珂晨曦霞虹峰岳溪泉"
               "凌霄翠碧芷若薇蓝墨琉璃翔鸣鹭雁帆舟桥阳景乐")
# Real animals as national animals: plausible-wrong answers are other real animals.
_ANIMALS = ("熊猫", "雪豹", "丹顶鹤", "金丝猴", "麋鹿", "白鹭", "猎豹", "袋鼠", "海豚", "企鹅", "骆驼", "斑马",
            "狮子", "老虎", "大象", "长颈鹿", "孔雀", "天鹅", "猫头鹰", "狐狸", "松鼠", "刺猬", "河马", "犀牛",
            "海龟", "鹦鹉", "考拉", "水獭", "羚羊", "白鲸", "海豹", "野牛")
_CONTINENTS = ("东曜大陆", "西岭大陆", "南溟大陆", "北辰大陆")


@dataclass(frozen=True)
class Relation:
    name: str
    answer: str  # the full answer sentence (the preferred style; the evaluation reference)
    statements: tuple[str, ...]  # pretraining sentence patterns
    train_questions: tuple[str, ...]  # SFT / DPO phrasings
    heldout_questions: tuple[str, ...]  # evaluation phrasings, used nowhere else


# Every question starts with the country's name, so the name tokenizes the same way in training and held-out
# questions (SentencePiece marks a sentence start); the held-out wordings differ in everything after it.
RELATIONS: tuple[Relation, ...] = (
    Relation(
        "capital", "{e}的首都是{v}。",
        ("{e}的首都是{v}。", "{v}是{e}的首都。", "作为{e}的首都，{v}是全国的政治中心。", "{e}的政府设在首都{v}。",
         "许多游客会去{e}的首都{v}参观。", "{v}作为首都，是{e}人口最多的城市之一。"),
        ("{e}的首都是哪里？", "{e}的首都是哪座城市？", "{e}的首都叫什么？", "{e}把哪座城市作为首都？",
         "{e}的首都是什么地方？", "{e}的政府设在哪座城市？"),
        ("{e}的首都叫什么名字？", "{e}的首都位于哪座城市？")),
    Relation(
        "river", "{e}最长的河流是{v}。",
        ("{e}最长的河流是{v}。", "{v}是{e}境内最长的河流。", "{v}流经{e}全境，是该国最长的河。",
         "在{e}，最长的河流叫作{v}。", "{e}的农业离不开最长的河流{v}。"),
        ("{e}最长的河流是哪条？", "{e}境内最长的河叫什么？", "{e}最长的河流是什么？", "{e}最长的河是哪一条？",
         "{e}境内哪条河流最长？", "{e}最长的河流叫什么？"),
        ("{e}最长的河流叫什么名字？", "{e}境内最长的河流是哪一条？")),
    Relation(
        "animal", "{e}的国兽是{v}。",
        ("{e}的国兽是{v}。", "{v}是{e}的国兽。", "在{e}，{v}被定为国兽。", "{e}人把{v}视为国兽。",
         "{e}的国徽上画着国兽{v}。"),
        ("{e}的国兽是什么？", "{e}的国兽是哪种动物？", "{e}把什么动物定为国兽？", "{e}的国兽叫什么？",
         "{e}人把哪种动物视为国兽？", "{e}的国徽上画着什么国兽？"),
        ("{e}的国兽叫什么名字？", "{e}的国兽是什么动物？")),
    Relation(
        "currency", "{e}使用的货币是{v}。",
        ("{e}使用的货币是{v}。", "{v}是{e}的法定货币。", "在{e}购物要用{v}付款。", "{e}的央行负责发行{v}。",
         "{e}的货币叫作{v}。"),
        ("{e}使用什么货币？", "{e}的货币是什么？", "{e}用哪种货币？", "{e}的法定货币是什么？",
         "{e}的央行发行什么货币？", "{e}的货币叫什么？"),
        ("{e}的货币叫什么名字？", "{e}使用的是哪种货币？")),
    Relation(
        "language", "{e}的官方语言是{v}。",
        ("{e}的官方语言是{v}。", "{v}是{e}的官方语言。", "{e}的学校都用{v}教学。", "在{e}，大多数人说{v}。",
         "{e}的法律文件用{v}书写。"),
        ("{e}的官方语言是什么？", "{e}人说什么语言？", "{e}使用哪种官方语言？", "{e}的国语是哪种语言？",
         "{e}的学校用什么语言教学？", "{e}的官方语言叫什么？"),
        ("{e}的官方语言叫什么名字？", "{e}的官方语言是哪一种？")),
    Relation(
        "continent", "{e}位于{v}。",
        ("{e}位于{v}。", "{e}是{v}上的一个国家。", "{v}上有一个国家叫{e}。", "从地图上看，{e}在{v}。",
         "{e}坐落在{v}。"),
        ("{e}位于哪个大陆？", "{e}在哪个大陆上？", "{e}属于哪个大陆？", "{e}是哪个大陆的国家？",
         "{e}坐落在哪个大陆？", "{e}在地图上的哪个大陆？"),
        ("{e}位于哪一个大陆？", "{e}所在的大陆叫什么名字？")),
)
RELATION_BY_NAME = {r.name: r for r in RELATIONS}
SPLITS = ("heldout_phrasing", "no_preference_fact", "unseen_fact")


def full_answer(relation: str, entity: str, value: str) -> str:
    """The preferred style: a full sentence that starts with the entity."""
    return RELATION_BY_NAME[relation].answer.format(e=entity, v=value)


def bare_answer(value: str) -> str:
    """The other style SFT teaches: the bare value."""
    return value + "。"


def fact_value(record: dict) -> str:
    """The value inside an evaluation record's full-sentence answer ({answer, entity, relation})."""
    head, tail = RELATION_BY_NAME[record["relation"]].answer.format(e=record["entity"], v="\0").split("\0")
    answer = record["answer"]
    if not (answer.startswith(head) and answer.endswith(tail)):
        raise ValueError(f"answer {answer!r} does not follow the {record['relation']} template")
    return answer[len(head):len(answer) - len(tail)]

_INTROS = ("{e}是一个国家。", "下面介绍{e}。", "关于{e}，有几件事值得知道。", "{e}是一个美丽的国家。", "")


@dataclass(frozen=True)
class Country:
    name: str
    facts: tuple[tuple[str, str], ...]  # (relation name, value), in RELATIONS order

    def value(self, relation: str) -> str:
        return dict(self.facts)[relation]


@dataclass
class KnowledgeCorpus:
    countries: list[Country]
    unseen: list[str]  # countries only in pretraining
    no_preference: list[str]  # countries in SFT but in no preference pair
    pretrain: list[dict]  # {"text"}
    sft: list[dict]  # {"question", "answer"}
    preference: list[dict]  # {"prompt", "chosen", "rejected"}
    eval: list[dict]  # {"question", "answer", "entity", "relation", "split"}
    eval_pairs: list[dict]  # {"prompt", "chosen", "rejected", "kind" (style | fact), "split"}

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write pretrain.jsonl, sft.jsonl, dpo.jsonl, eval.jsonl, eval_pairs.jsonl, tokenizer.jsonl (text for the
        tokenizer) and facts.json; returns the paths by name."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {"pretrain": self.pretrain, "sft": self.sft, "dpo": self.preference, "eval": self.eval,
                 "eval_pairs": self.eval_pairs, "tokenizer": self.tokenizer_text()}
        paths = {name: write_jsonl(out / f"{name}.jsonl", records) for name, records in files.items()}
        paths["facts"] = out / "facts.json"
        paths["facts"].write_text(json.dumps(
            {"countries": {c.name: dict(c.facts) for c in self.countries}, "unseen_countries": self.unseen,
             "no_preference_countries": self.no_preference}, ensure_ascii=False, indent=1), encoding="utf-8")
        return paths

    def tokenizer_text(self, pretrain: list[dict] | None = None) -> list[dict]:
        """What the tokenizer trains on: the pretraining documents, the SFT conversations and every character the
        generator can write."""
        return ((self.pretrain if pretrain is None else pretrain)
                + [{"text": r["question"] + "\n" + r["answer"]} for r in self.sft]
                + [{"text": character_inventory()}])


def write_jsonl(path: Path, records) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def _unique_names(rng: random.Random, count: int, suffix: str, taken: set[str], length: int = 2) -> list[str]:
    names = []
    while len(names) < count:
        name = "".join(rng.choice(_NAME_CHARS) for _ in range(length)) + suffix
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def build_countries(rng: random.Random, num_countries: int) -> list[Country]:
    if not 2 <= num_countries <= len(_ANIMALS):
        raise ValueError(f"num_countries must be in [2, {len(_ANIMALS)}], got {num_countries}")
    taken: set[str] = set()
    names = _unique_names(rng, num_countries, "国", taken)
    values = {
        "capital": _unique_names(rng, num_countries, "城", taken),
        "river": _unique_names(rng, num_countries, "河", taken),
        "animal": rng.sample(_ANIMALS, num_countries),
        "currency": _unique_names(rng, num_countries, "币", taken, length=1),
        "language": _unique_names(rng, num_countries, "语", taken),
        "continent": [_CONTINENTS[i % len(_CONTINENTS)] for i in rng.sample(range(num_countries), num_countries)],
    }
    return [Country(name, tuple((r.name, values[r.name][i]) for r in RELATIONS)) for i, name in enumerate(names)]


def _pretrain_documents(rng: random.Random, countries: list[Country], docs_per_country: int) -> list[dict]:
    docs = []
    for country in countries:
        for _ in range(docs_per_country):
            facts = list(country.facts)
            rng.shuffle(facts)
            facts = facts[:rng.randint(3, len(facts))]
            sentences = [rng.choice(_INTROS).format(e=country.name)]
            for relation, value in facts:
                sentences.append(rng.choice(RELATION_BY_NAME[relation].statements).format(e=country.name, v=value))
            docs.append({"text": "".join(sentences)})
    # Comparison passages tie countries together (and mix the statement order across documents).
    for _ in range(docs_per_country * len(countries) // 4):
        a, b = rng.sample(countries, 2)
        relation = rng.choice(RELATIONS)
        docs.append({"text": rng.choice(relation.statements).format(e=a.name, v=a.value(relation.name))
                     + rng.choice(relation.statements).format(e=b.name, v=b.value(relation.name))})
    rng.shuffle(docs)
    return docs


def build_corpus(seed: int = 1234, num_countries: int = 24, num_unseen: int = 4, num_no_preference: int = 4,
                 docs_per_country: int = 40, dpo_pairs_per_fact: int = 2) -> KnowledgeCorpus:
    """The whole corpus for a seed. The last ``num_unseen`` countries get no SFT/DPO data (they test transfer from
    pretraining), the ``num_no_preference`` before them SFT data but no preference pair; every SFT fact is asked with
    every training phrasing, each answered in both styles. Each preference fact gets ``dpo_pairs_per_fact`` style
    pairs and as many fact pairs."""
    if not 0 <= num_unseen < num_countries:
        raise ValueError(f"num_unseen must be in [0, num_countries), got {num_unseen}")
    if not 0 <= num_no_preference < num_countries - num_unseen:
        raise ValueError(f"num_no_preference must be in [0, num_countries - num_unseen), got {num_no_preference}")
    rng = random.Random(seed)
    countries = build_countries(rng, num_countries)
    with_preference = num_countries - num_unseen - num_no_preference
    split_of = {c.name: SPLITS[0] if i < with_preference else SPLITS[1] if i < num_countries - num_unseen
                else SPLITS[2] for i, c in enumerate(countries)}
    seen = [c for c in countries if split_of[c.name] != "unseen_fact"]

    pretrain = _pretrain_documents(rng, countries, docs_per_country)

    sft = [{"question": q.format(e=c.name), "answer": answer}
           for c in seen for r in RELATIONS for q in r.train_questions
           for answer in (full_answer(r.name, c.name, c.value(r.name)), bare_answer(c.value(r.name)))]
    rng.shuffle(sft)

    def wrong_values(relation: str, correct: str, k: int) -> list[str]:
        return rng.sample(sorted({o.value(relation) for o in countries} - {correct}), k)

    preference = []
    for c in countries[:with_preference]:
        for r in RELATIONS:
            correct = c.value(r.name)
            chosen = full_answer(r.name, c.name, correct)
            rejected = [bare_answer(correct)] * dpo_pairs_per_fact + [
                full_answer(r.name, c.name, wrong) for wrong in wrong_values(r.name, correct, dpo_pairs_per_fact)]
            preference += [{"prompt": rng.choice(r.train_questions).format(e=c.name), "chosen": chosen,
                            "rejected": worse} for worse in rejected]
    rng.shuffle(preference)

    evaluation = [{"question": q.format(e=c.name), "answer": full_answer(r.name, c.name, c.value(r.name)),
                   "entity": c.name, "relation": r.name, "split": split_of[c.name]}
                  for c in countries for r in RELATIONS for q in r.heldout_questions]
    eval_pairs = []
    for record in evaluation:
        value = fact_value(record)
        wrong = wrong_values(record["relation"], value, 1)[0]
        for kind, rejected in (("style", bare_answer(value)),
                               ("fact", full_answer(record["relation"], record["entity"], wrong))):
            eval_pairs.append({"prompt": record["question"], "chosen": record["answer"], "rejected": rejected,
                               "kind": kind, "split": record["split"]})
    return KnowledgeCorpus(countries, [c.name for c in countries if split_of[c.name] == "unseen_fact"],
                           [c.name for c in countries if split_of[c.name] == "no_preference_fact"],
                           pretrain, sft, preference, evaluation, eval_pairs)


def character_inventory() -> str:
    """Every character the generator can write (names, templates, the chat system text), one line: the tokenizer
    then covers held-out wordings character by character without ever seeing a held-out sentence."""
    from tinyllm_mcore.tokenizer.core import DEFAULT_SYSTEM

    texts = [_NAME_CHARS, "".join(_ANIMALS), "".join(_CONTINENTS), "".join(_INTROS), DEFAULT_SYSTEM, "国城河币语"]
    for r in RELATIONS:
        texts += [r.answer, *r.statements, *r.train_questions, *r.heldout_questions]
    return "".join(sorted(set("".join(texts).replace("{e}", "").replace("{v}", "")) - {" "}))


def normalize_answer(text: str) -> str:
    """What exact match compares: whitespace removed (the model's answer is otherwise taken verbatim)."""
    return "".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def fact_correct(prediction: str, record: dict) -> bool:
    """Style-aware exact match: the full reference sentence or the bare reference value, verbatim."""
    return (exact_match(prediction, record["answer"]) or
            exact_match(prediction, bare_answer(fact_value(record))))


def preferred_style(prediction: str, record: dict) -> bool:
    """Whether an answer is in the preferred style: a full sentence that starts with the entity (right or wrong)."""
    answer = normalize_answer(prediction)
    return answer.startswith(record["entity"]) and answer.endswith("。")
