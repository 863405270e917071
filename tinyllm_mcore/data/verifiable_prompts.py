"""Prompts whose answers a program can check, and the reward of a sampled response: what GRPO trains on.

Two sources, one interface (``VerifiableSource``: ``train_item(i)``, ``heldout``, ``correctness(answer, item)``):

* ``TaskSource`` (``--task NAME``): a procedural task of the ``reasoning-gym`` package (chain_sum,
  basic_arithmetic, countdown, …), scored by that task's own ``score_answer``. reasoning-gym makes item ``j`` of a
  dataset from ``Random(seed + j)``, so items are a pure function of (task, config, seed, j): the held-out set is
  the first ``H`` distinct questions of items ``0 … k−1``, training item ``i`` is item ``k + i mod T`` — disjoint
  index ranges, hence disjoint random streams — and a training item whose question text equals a held-out question
  (small tasks repeat themselves) is replaced by the next index that is not held out, so no held-out question is
  ever trained on.
* ``PromptFile`` (``--prompts FILE.jsonl``): ``{"prompt", "answer"}`` lines (other keys ignored), checked strictly
  (an empty file, bad JSON or a missing key is one error naming the file and line). A seeded shuffle holds out
  ``heldout_size`` records (and any record sharing a held-out prompt); training walks the rest epoch by epoch,
  reshuffled each epoch. Scored by exact match of the final answer, or by ``math-verify`` (``scorer="math-verify"``:
  equal as mathematics, e.g. ``1/2`` = ``0.5`` = ``\\frac{1}{2}``).

Either way ``train_item(i)`` is random access and deterministic, so the stage can map its consumed-samples counter
to prompts exactly as the other stages map it to samples (resume continues the same prompt sequence).

The final answer of a response (``final_answer``): the text of its last ``<answer>…</answer>`` (reasoning-gym's
answer convention), else its last non-empty line. The prompt a model sees is the question as a user turn of the
project's one chat format (``prompt_ids``; the HF side applies the exported chat template to ``chat_messages``).

The reward is one table (``reward_table``):

    =========  ======================================================================  ================
    term       rule                                                                    weight
    =========  ======================================================================  ================
    correct    the source's score of the final answer, in [0, 1]: reasoning-gym's      1
               ``score_answer`` (partial credit where the task gives it), exact match
               or math-verify (0 or 1)
    format     1 when the response ends with one non-empty ``<answer>…</answer>``       ``format_weight``
               (nothing but whitespace after it), else 0                               (0: off)
    =========  ======================================================================  ================

    reward = Σ weight · value; a response is *accurate* when its ``correct`` value is 1.

``last_integer_correct`` is the quickstart's held-out rule (the last integer in the greedy answer equals the
answer), the one a transformers evaluation of an HF export applies too.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

# ---------------------------------------------------------------------------------------------------------------
# Items, answers, prompts


@dataclass(frozen=True)
class VerifiableItem:
    """One prompt with its reference answer. ``entry`` is reasoning-gym's item (its scorer reads the metadata);
    ``origin`` says where it came from (``chain_sum[17]``, ``file.jsonl:4``) for messages and reports."""
    question: str
    answer: str
    origin: str
    entry: dict | None = field(default=None, compare=False, repr=False)


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ENDS_WITH_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>\s*\Z", re.DOTALL)
# An integer not glued to a preceding digit: "3-5" ends in 5, "= -5" in -5.
_INTEGER = re.compile(r"(?<!\d)-?\d+")


def final_answer(response: str) -> str | None:
    """The last ``<answer>…</answer>`` text, else the last non-empty line (stripped); None for an empty response."""
    tagged = _ANSWER_TAG.findall(response)
    if tagged:
        return tagged[-1].strip()
    lines = [line.strip() for line in response.splitlines() if line.strip()]
    return lines[-1] if lines else None


def has_answer_format(response: str) -> bool:
    """The format term's rule: the response ends with one non-empty answer tag (whitespace after it allowed)."""
    if response.count("<answer>") != 1 or response.count("</answer>") != 1:
        return False
    match = _ENDS_WITH_ANSWER_TAG.search(response)
    return bool(match and match.group(1).strip())


def last_integer(text: str) -> int | None:
    found = _INTEGER.findall(text)
    return int(found[-1]) if found else None


def last_integer_correct(response: str, answer: int | str) -> bool:
    """The quickstart's held-out score: the last integer in the response equals ``answer``."""
    value = last_integer(response)
    return value is not None and value == int(answer)


def chat_messages(question: str) -> list[dict]:
    """The question as the conversation a model answers (one user turn)."""
    return [{"role": "user", "content": question}]


def prompt_ids(tokenizer, item: VerifiableItem, system: str | None = None) -> list[int]:
    """Token ids of ``item``'s prompt in the project's chat format, ending in the generation prompt."""
    return tokenizer.chat_prompt_ids(chat_messages(item.question), system)


# ---------------------------------------------------------------------------------------------------------------
# Sources


class VerifiableSource(Protocol):
    name: str
    scorer: str  # what the "correct" term applies: reasoning-gym, exact or math-verify
    heldout: list[VerifiableItem]

    def train_item(self, index: int) -> VerifiableItem: ...

    def correctness(self, answer: str | None, item: VerifiableItem) -> float: ...


def check_task_name(name: str) -> None:
    """One line naming close task names when `name` is not a reasoning-gym task."""
    from reasoning_gym.factory import DATASETS

    if name not in DATASETS:
        raise ValueError(f"--task {name}: not a reasoning-gym task; e.g. {', '.join(_suggest(name, DATASETS))} "
                         f"({len(DATASETS)} tasks: python -c 'import reasoning_gym.factory as f; "
                         "print(sorted(f.DATASETS))')")


class TaskSource:
    """A reasoning-gym task (module docstring). ``config``: the task's own config fields (e.g. ``max_terms``);
    ``train_size``: how many items training cycles through (some tasks size their tables by the dataset size)."""

    # How many consecutive training indices may be held-out questions before the task counts as exhausted.
    MAX_PROBES = 1000

    def __init__(self, name: str, seed: int = 1234, heldout_size: int = 200, config: dict | None = None,
                 train_size: int = 100_000):
        import reasoning_gym
        from reasoning_gym.factory import DATASETS

        check_task_name(name)
        if heldout_size < 0 or train_size < 1:
            raise ValueError(f"--task {name}: the held-out size must be >= 0 and the training size >= 1")
        config = dict(config or {})
        reserved = sorted({"seed", "size"} & set(config))
        if reserved:
            raise ValueError(f"--task {name}: {' and '.join(reserved)} come from the run (its seed and set sizes), "
                             "not from the task config")
        settable = _config_fields(DATASETS[name][1]) - {"seed", "size"}
        unknown = sorted(set(config) - settable)
        if unknown:
            raise ValueError(f"--task {name}: unknown config key(s) {', '.join(unknown)}; the task has "
                             f"{', '.join(sorted(settable))}")
        try:
            # the held-out scan reads at most MAX_PROBES + 2·H items (below)
            size = self.MAX_PROBES + 2 * heldout_size + train_size
            self.dataset = reasoning_gym.create_dataset(name, seed=seed, size=size, **config)
        except (AssertionError, TypeError, ValueError) as e:  # the config classes validate with assert
            raise ValueError(f"--task {name}: invalid config {config}: {e}") from None
        self.name, self.seed, self.train_size = name, seed, train_size
        self.scorer = "reasoning-gym"
        self.heldout, self._heldout_questions, j = [], set(), 0
        while len(self.heldout) < heldout_size:  # the first heldout_size distinct questions
            if j >= self.MAX_PROBES + 2 * heldout_size:
                raise ValueError(f"--task {name}: fewer than {heldout_size} distinct questions in its first {j} "
                                 "items; hold out fewer, or make the task harder")
            item = self._item(j)
            if item.question not in self._heldout_questions:
                self.heldout.append(item)
                self._heldout_questions.add(item.question)
            j += 1
        self._train_start = j
        self.scorer_failures = 0  # scorer exceptions on model text, scored 0

    def _item(self, j: int) -> VerifiableItem:
        entry = self.dataset[j]
        return VerifiableItem(entry["question"], str(entry["answer"]), f"{self.name}[{j}]", entry)

    def train_item(self, index: int) -> VerifiableItem:
        for probe in range(self.MAX_PROBES):
            item = self._item(self._train_start + (index + probe) % self.train_size)
            if item.question not in self._heldout_questions:
                return item
        raise ValueError(f"--task {self.name}: {self.MAX_PROBES} training items in a row are held-out questions; "
                         "the task has too few distinct questions for this held-out size (hold out fewer, or "
                         "make the task harder)")

    def correctness(self, answer: str | None, item: VerifiableItem) -> float:
        try:
            score = float(self.dataset.score_answer(answer, item.entry))
        except Exception:  # a task's scorer parsing arbitrary model text (sympy, int()) is not our bug to raise
            self.scorer_failures += 1
            return 0.0
        return score if math.isfinite(score) else 0.0


SCORERS = ("exact", "math-verify")  # for prompt files; a task is scored by reasoning-gym
_SCORER_RULES = {"reasoning-gym": "the task's own score_answer", "exact": "exact match (whitespace collapsed)",
                 "math-verify": "math-verify equivalence"}


class PromptFile:
    """``{"prompt", "answer"}`` jsonl (module docstring); ``scorer``: ``exact`` or ``math-verify``."""

    def __init__(self, path: str | Path, scorer: str = "exact", seed: int = 1234, heldout_size: int = 0):
        if scorer not in SCORERS:
            raise ValueError(f"unknown answer scorer {scorer!r}; use one of {', '.join(SCORERS)}")
        self.name, self.scorer, self.seed = str(path), scorer, seed
        items = read_prompt_file(path)
        if heldout_size < 0 or heldout_size >= len(items):
            raise ValueError(f"{path}: cannot hold out {heldout_size} of its {len(items)} prompts (training needs "
                             "at least one)")
        order = np.random.default_rng(seed).permutation(len(items))
        self.heldout = [items[j] for j in sorted(order[:heldout_size])]
        held = {item.question for item in self.heldout}
        self.train = [items[j] for j in sorted(order[heldout_size:]) if items[j].question not in held]
        if not self.train:
            raise ValueError(f"{path}: every prompt is also a held-out prompt; hold out fewer")
        self._epoch, self._order = -1, None

    def train_item(self, index: int) -> VerifiableItem:
        epoch, position = divmod(index, len(self.train))
        if epoch != self._epoch:  # a fresh order each epoch, a pure function of (seed, epoch)
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.train))
            self._epoch = epoch
        return self.train[int(self._order[position])]

    def correctness(self, answer: str | None, item: VerifiableItem) -> float:
        if answer is None:
            return 0.0
        if self.scorer == "exact":
            return float(_normalize(answer) == _normalize(item.answer))
        return float(math_verify_equal(item.answer, answer))


def read_prompt_file(path: str | Path) -> list[VerifiableItem]:
    """Every ``{"prompt", "answer"}`` line of ``path``; blank lines are skipped, anything else malformed is an error
    naming the file and line. ``answer`` may be a JSON string or number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file")
    items = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{number}"
            try:
                text = raw.decode("utf-8")
                record = json.loads(text[1:] if text.startswith("\ufeff") else text)
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start + 1})") from None
            except ValueError as e:
                raise ValueError(f"{where}: not a JSON object ({e})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object with \"prompt\" and \"answer\", got "
                                 f"{type(record).__name__}")
            missing = [key for key in ("prompt", "answer") if key not in record]
            if missing:
                raise ValueError(f"{where}: missing key {' and '.join(repr(k) for k in missing)} (each line is "
                                 "{\"prompt\": ..., \"answer\": ...})")
            prompt, answer = record["prompt"], record["answer"]
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"{where}: \"prompt\" must be a non-empty string")
            if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
                raise ValueError(f"{where}: \"answer\" must be a non-empty string or a number")
            items.append(VerifiableItem(prompt, str(answer).strip(), where))
    if not items:
        raise ValueError(f"--prompts {path}: no prompts (the file is empty)")
    return items


def math_verify_equal(reference: str, answer: str) -> bool:
    """math-verify's equivalence of ``answer`` to ``reference`` (it parses LaTeX and plain expressions; its
    timeouts use SIGALRM, so call it from the main thread)."""
    from math_verify import parse, verify

    gold, predicted = parse(reference), parse(answer)
    return bool(gold and predicted and verify(gold, predicted))


def _normalize(text: str) -> str:
    return " ".join(text.split())


def _config_fields(config_cls) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(config_cls)}


def _suggest(name: str, names: Sequence[str], count: int = 6) -> list[str]:
    """The tasks closest to a mistyped name, then the arithmetic ones this project demonstrates."""
    import difflib

    close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.6)
    common = [n for n in ("chain_sum", "basic_arithmetic", "countdown", "gsm_symbolic") if n in names]
    return list(dict.fromkeys(close + common))[:count]


# ---------------------------------------------------------------------------------------------------------------
# The reward table


@dataclass(frozen=True)
class RewardTerm:
    """One row of the reward table: ``value(response, item)`` times ``weight``; ``rule`` says what earns it."""
    name: str
    rule: str
    weight: float
    value: Callable[[str, VerifiableItem], float]


@dataclass(frozen=True)
class Reward:
    total: float
    terms: dict[str, float]  # term name -> unweighted value

    @property
    def accurate(self) -> bool:
        return self.terms["correct"] >= 1.0


class RewardTable:
    """The reward function (module docstring's table): ``score(response, item)`` -> ``Reward``."""

    def __init__(self, terms: Sequence[RewardTerm]):
        self.terms = tuple(terms)

    def score(self, response: str, item: VerifiableItem) -> Reward:
        values = {term.name: float(term.value(response, item)) for term in self.terms}
        return Reward(sum(term.weight * values[term.name] for term in self.terms), values)

    def describe(self) -> list[str]:
        """One line per term, for logs and the report."""
        return [f"{term.name} × {term.weight:g}: {term.rule}" for term in self.terms]


def reward_table(source: VerifiableSource, format_weight: float = 0.0) -> RewardTable:
    """The table for ``source``: ``correct`` always, ``format`` when ``format_weight`` is not 0."""
    if not math.isfinite(format_weight) or format_weight < 0:
        raise ValueError(f"--format-reward must be a finite weight >= 0, got {format_weight}")
    terms = [RewardTerm("correct", f"{_SCORER_RULES[source.scorer]} of the final answer (the last "
                        "<answer>…</answer>, else the last line)", 1.0,
                        lambda response, item: source.correctness(final_answer(response), item))]
    if format_weight:
        terms.append(RewardTerm("format", "the response ends with one non-empty <answer>…</answer>", format_weight,
                                lambda response, item: float(has_answer_format(response))))
    return RewardTable(terms)
