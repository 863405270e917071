"""The RL quickstart's task: sums of three one-digit numbers, answered step by step by an unreliable teacher.

A problem is ``计算 a+b+c``; the teacher's answer writes both partial sums and then the result in reasoning-gym's
answer tag:

    3+5=8
    8+2=10
    <answer>10</answer>

The two arithmetic lines are always right. The answer tag is not: when it is careless the teacher restates the
*first* partial sum (``<answer>8</answer>``), and it is careless far more often when the last term is above 3
(``CARELESS``). SFT on its answers therefore learns the arithmetic and, for last terms above 3, the careless habit as
the likelier answer: greedy decoding is then right on at most the third of problems ending in 1-3 (above 0, below
50%), while sampling is still right some of the time on every problem. That is the situation GRPO with a
verifier is for: the reward (exact match of the tag) tells the careful answers apart, and the policy learns to
restate the line it just computed — on held-out problems too, since the habit is not tied to particular numbers.

Problems are split once, by a seeded shuffle: ``EVAL_SIZE`` held-out problems (never in SFT or GRPO data), the rest
for training. Everything is a pure function of the seed.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

DIGITS = range(1, 10)
EVAL_SIZE = 200
# P(the teacher restates the first partial sum): by whether the last term is above 3
CARELESS = {"above 3": 0.8, "1-3": 0.2}


@dataclass(frozen=True)
class Problem:
    a: int
    b: int
    c: int

    @property
    def question(self) -> str:
        return f"计算 {self.a}+{self.b}+{self.c}"

    @property
    def answer(self) -> int:
        return self.a + self.b + self.c

    def careful_answer(self) -> str:
        return self.worked(self.answer)

    def worked(self, final: int) -> str:
        first = self.a + self.b
        return f"{self.a}+{self.b}={first}\n{first}+{self.c}={self.answer}\n<answer>{final}</answer>"

    def teacher_answer(self, rng: random.Random) -> str:
        careless = CARELESS["above 3" if self.c > 3 else "1-3"]
        return self.worked(self.a + self.b if rng.random() < careless else self.answer)


def split_problems(seed: int) -> tuple[list[Problem], list[Problem]]:
    """(training problems, held-out problems): every a+b+c with one-digit terms, EVAL_SIZE of them held out."""
    problems = [Problem(a, b, c) for a in DIGITS for b in DIGITS for c in DIGITS]
    random.Random(seed).shuffle(problems)
    return problems[EVAL_SIZE:], problems[:EVAL_SIZE]


def write_jsonl(path: Path, records) -> Path:
    from tinyllm_mcore.runtime.files import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    return path


def write_task_files(data: Path, heldout_dir: Path, seed: int, teacher_samples: int) -> dict[str, Path]:
    """sft.jsonl ({"system": "", "question", "answer"}: `teacher_samples` teacher answers per training problem, shuffled),
    prompts.jsonl (GRPO's {"prompt", "answer"} of the training problems), eval.jsonl (held-out {"question",
    "answer"}, answer an integer; in `heldout_dir`) and tokenizer.jsonl (text the character vocabulary is built from);
    all but eval.jsonl in `data`."""
    train, heldout = split_problems(seed)
    rng = random.Random(seed + 1)
    sft = [{"system": "", "question": p.question, "answer": p.teacher_answer(rng)}
           for p in train for _ in range(teacher_samples)]
    rng.shuffle(sft)
    return {
        "sft": write_jsonl(data / "sft.jsonl", sft),
        "prompts": write_jsonl(data / "prompts.jsonl", ({"prompt": p.question, "answer": str(p.answer)}
                                                            for p in train)),
        "eval": write_jsonl(heldout_dir / "eval.jsonl", ({"question": p.question, "answer": p.answer} for p in heldout)),
        "tokenizer": write_jsonl(data / "tokenizer.jsonl",
                                 ({"text": p.question + "\n" + p.careful_answer()} for p in train)),
    }
