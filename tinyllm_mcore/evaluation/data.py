"""Multiple-choice question files: CMMLU and C-Eval CSV layouts.

* CMMLU: ``{root}/{split}/{subject}.csv`` with header ``,Question,A,B,C,D,Answer`` (split = dev | test).
* C-Eval: ``{root}/{split}/{subject}_{split}.csv`` with header ``id,question,A,B,C,D,answer[,explanation]``
  (split = dev | val | test; C-Eval's public test split has no answers and cannot be scored here).

Rows that cannot be asked (an empty question or option, an answer outside A-D, a short row) are skipped and
counted with their reason, never silently dropped.
"""
from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

LETTERS = ("A", "B", "C", "D")
BENCHMARKS = ("cmmlu", "ceval")


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    options: tuple[str, str, str, str]
    answer: str  # one of LETTERS


@dataclass
class SubjectFile:
    subject: str
    path: Path
    questions: list[Question]
    skipped: Counter = field(default_factory=Counter)  # reason -> rows
    skipped_rows: list[tuple[int, str]] = field(default_factory=list)  # (CSV line number, reason)


class EvalDataError(ValueError):
    """A data directory or file that cannot be evaluated at all (one line for the CLI)."""


def _column(header: list[str], *names: str) -> int:
    lowered = [h.strip().lower() for h in header]
    for name in names:
        if name.lower() in lowered:
            return lowered.index(name.lower())
    raise KeyError(names[0])


def read_questions(path: str | Path, subject: str | None = None) -> SubjectFile:
    """Read one CMMLU or C-Eval CSV (the header decides which)."""
    path = Path(path)
    subject = subject or subject_from_filename(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError as e:  # CMMLU/C-Eval ship UTF-8; a GBK re-save is the usual culprit
        raise EvalDataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); convert it, e.g. "
                            f"iconv -f GBK -t UTF-8") from None
    except csv.Error as e:
        raise EvalDataError(f"{path}: unreadable CSV ({e})") from None
    if not rows:
        raise EvalDataError(f"{path}: empty file")
    header = rows[0]
    try:
        q_col = _column(header, "Question")
        option_cols = [_column(header, letter) for letter in LETTERS]
        a_col = _column(header, "Answer")
    except KeyError as e:
        raise EvalDataError(f"{path}: header {header!r} has no {e.args[0]!r} column (expected CMMLU "
                            f"',Question,A,B,C,D,Answer' or C-Eval 'id,question,A,B,C,D,answer')")
    id_col = 0 if q_col != 0 else None
    result = SubjectFile(subject, path, [])
    needed = max(q_col, a_col, *option_cols) + 1
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue  # blank line
        reason = None
        if len(row) < needed:
            reason = "short row"
        else:
            question = row[q_col].strip()
            options = tuple(row[c].strip() for c in option_cols)
            answer = row[a_col].strip().upper()
            if not question:
                reason = "empty question"
            elif any(not o for o in options):
                reason = "missing option"
            elif answer not in LETTERS:
                reason = "answer not in A-D"
        if reason:
            result.skipped[reason] += 1
            result.skipped_rows.append((line, reason))
            continue
        qid = row[id_col].strip() if id_col is not None else str(line - 2)
        result.questions.append(Question(qid, question, options, answer))
    return result


def subject_from_filename(path: Path) -> str:
    """``agronomy.csv`` (CMMLU) or ``computer_network_val.csv`` (C-Eval) -> the subject."""
    stem = path.stem
    for split in ("_dev", "_val", "_test"):
        if stem.endswith(split):
            return stem[: -len(split)]
    return stem


def detect_benchmark(root: str | Path) -> str:
    """cmmlu when the files are ``{split}/{subject}.csv``; ceval when they are ``{split}/{subject}_{split}.csv``."""
    root = Path(root)
    if not root.is_dir():
        raise EvalDataError(f"benchmark directory not found: {root}")
    for split_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in split_dir.glob("*.csv"):
            return "ceval" if f.stem.endswith("_" + split_dir.name) else "cmmlu"
    raise EvalDataError(f"{root}: no {{split}}/*.csv files (expected e.g. {root}/test/agronomy.csv)")


def subject_file(root: str | Path, subject: str, split: str, benchmark: str) -> Path:
    root = Path(root)
    return root / split / (f"{subject}.csv" if benchmark == "cmmlu" else f"{subject}_{split}.csv")


def list_subjects(root: str | Path, split: str, benchmark: str) -> list[str]:
    folder = Path(root) / split
    if not folder.is_dir():
        raise EvalDataError(f"{folder} does not exist (the --split folder of the benchmark directory)")
    subjects = sorted(subject_from_filename(p) for p in folder.glob("*.csv"))
    if not subjects:
        raise EvalDataError(f"{folder} has no CSV files")
    return subjects
