"""CMMLU / C-Eval multiple choice in two modes.

Prompt (lm-evaluation-harness's cmmlu/ceval tasks and OpenCompass's wording)::

    以下是关于{科目}的单项选择题，请直接给出正确答案的选项。\\n\\n
    {shot question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案： {shot answer}\\n\\n      (k times, dev split)
    {question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案：

* ppl mode: the score of an option is log p(" X" | prompt) — the continuation tokens are what encoding
  prompt + " X" adds after the prompt's own tokens (lm-evaluation-harness's split) — and the best-scoring option is
  the model's choice. The four options share the prompt: when each continuation is one token, one forward of the
  prompt scores all four (the rows are de-duplicated), and the LM head runs only at the positions read.
* gen mode: the same text as a chat turn (each shot an earlier user/assistant exchange), greedy generation, and the
  letter parsed from the answer (`parse_choice`); an answer with no recognisable letter counts as wrong and is
  reported.

Per-subject accuracy, category averages (mean of the subjects' accuracies, as CMMLU's own script computes them) and
the overall average over subjects; the question-weighted accuracy is reported beside it.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from tinyllm_mcore.evaluation import subjects as subject_tables
from tinyllm_mcore.evaluation.backends import CausalLM, pad_rows
from tinyllm_mcore.evaluation.data import LETTERS, Question, SubjectFile

HEADER = "以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n"
ANSWER_CUE = "答案："


def question_text(q: Question) -> str:
    options = "".join(f"\n{letter}. {option}" for letter, option in zip(LETTERS, q.options))
    return f"{q.question}{options}\n{ANSWER_CUE}"


def ppl_context(subject_name: str, shots: Sequence[Question], q: Question) -> str:
    shot_text = "".join(f"{question_text(s)} {s.answer}\n\n" for s in shots)
    return HEADER.format(subject=subject_name) + shot_text + question_text(q)


def chat_messages(subject_name: str, shots: Sequence[Question], q: Question) -> list[dict]:
    header = HEADER.format(subject=subject_name)
    messages = []
    for s in shots:
        messages += [{"role": "user", "content": header + question_text(s)},
                     {"role": "assistant", "content": s.answer}]
    return messages + [{"role": "user", "content": header + question_text(q)}]


def encode_pair(encoder, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids): encode the whole text and the context, the continuation is the rest."""
    whole = encoder.encode(context + continuation)
    context_ids = encoder.encode(context)
    return context_ids, whole[len(context_ids):]


# ---------------------------------------------------------------------------------------------------------------
# Scoring continuations


@dataclass
class ScoreStats:
    rows: int = 0  # forwarded sequences (after de-duplication)
    requests: int = 0
    truncated: int = 0  # requests whose context was cut on the left to fit the model
    tokens: int = 0  # forwarded tokens (without padding; a shared prefix counts once)
    seconds: float = 0.0


def _common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    first, n = rows[0], min(len(r) for r in rows)
    for i in range(n):
        if any(r[i] != first[i] for r in rows):
            return i
    return n


def score_continuations(lm: CausalLM, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                        batch_size: int = 32, max_batch_tokens: int = 32768, share_prefix: bool = True,
                        min_shared_prefix: int = 32, stats: ScoreStats | None = None) -> list[float]:
    """Sum of log p(continuation | context) for each (context ids, continuation ids) pair.

    Each pair needs the forward of row = (context + continuation)[:-1] and the log-probs at the continuation's
    positions. Identical rows (the options of one question when each option is one token) are forwarded once. With
    `share_prefix` and a backend that supports it, rows sharing a prefix of at least `min_shared_prefix` tokens (the
    header and shots of a k-shot subject) form a group whose prefix is forwarded once and continued from its KV
    cache. Rows longer than the model are cut on the left (the continuation is kept whole).
    """
    stats = stats if stats is not None else ScoreStats()
    start = time.perf_counter()
    row_ids: dict[tuple[int, ...], int] = {}
    rows: list[tuple[int, ...]] = []
    row_requests: list[list[tuple[int, list[int], list[int]]]] = []  # per row: (request, positions, targets)
    for i, (context, continuation) in enumerate(pairs):
        context, continuation = list(context), list(continuation)
        if not continuation:
            raise ValueError("empty continuation: nothing to score")
        if len(continuation) > lm.max_length:
            raise ValueError(f"continuation of {len(continuation)} tokens exceeds the model's {lm.max_length}")
        whole = context + continuation
        if len(whole) - 1 > lm.max_length:
            whole = whole[-(lm.max_length + 1):]
            stats.truncated += 1
        row = tuple(whole[:-1])
        if not row:
            raise ValueError("empty context: give the model at least one token before the continuation")
        first = len(whole) - len(continuation) - 1
        positions = list(range(first, len(row)))
        if row not in row_ids:
            row_ids[row] = len(rows)
            rows.append(row)
            row_requests.append([])
        row_requests[row_ids[row]].append((i, positions, continuation))

    scores = [0.0] * len(pairs)
    # Groups of rows that share a long prefix (one k-shot subject's prompts: header + shots): sorted order puts them
    # side by side; each group's prefix then runs once. Everything else forms one group without a shared prefix.
    groups: list[tuple[list[int], int]] = []
    loose: list[int] = list(range(len(rows)))
    if share_prefix and getattr(lm, "supports_prefix_cache", False):
        order, loose = sorted(range(len(rows)), key=lambda r: rows[r]), []
        i = 0
        while i < len(order):
            j = i + 1
            while j < len(order) and _common_prefix_length([rows[order[i]], rows[order[j]]]) >= min_shared_prefix:
                j += 1
            run = order[i:j]
            # the shared prefix ends before the first position any row reads
            shared = min(_common_prefix_length([rows[run[0]], rows[run[-1]]]),
                         min(ps[0] for r in run for _, ps, _ in row_requests[r]))
            if len(run) > 1 and shared >= min_shared_prefix:
                groups.append((run, shared))
            else:
                loose += run
            i = j
    groups.append((loose, 0))

    for group, shared in groups:
        if not group:
            continue
        group = sorted(group, key=lambda r: -len(rows[r]))  # similar lengths together: little padding
        cache = lm.prefix_cache(list(rows[group[0]][:shared])) if shared else None
        stats.tokens += shared
        at = 0
        while at < len(group):
            batch = [group[at]]
            width = len(rows[group[at]]) - shared
            while (at + len(batch) < len(group) and len(batch) < batch_size
                   and (len(batch) + 1) * width <= max_batch_tokens):
                batch.append(group[at + len(batch)])
            at += len(batch)
            positions_per_row = [sorted({p for _, ps, _ in row_requests[r] for p in ps}) for r in batch]
            n = max(len(p) for p in positions_per_row)
            positions = torch.tensor([p + [p[-1]] * (n - len(p)) for p in positions_per_row]) - shared
            suffixes = pad_rows([rows[r][shared:] for r in batch])
            if shared:
                logits = lm.logits_after_prefix(cache, shared, suffixes, positions)
            else:
                logits = lm.logits_at(suffixes, positions)
            logprobs = torch.log_softmax(logits, dim=-1)
            for b, r in enumerate(batch):
                column = {p: j for j, p in enumerate(positions_per_row[b])}
                for request, ps, targets in row_requests[r]:
                    scores[request] = float(sum(logprobs[b, column[p], t] for p, t in zip(ps, targets)))
            stats.tokens += sum(len(rows[r]) - shared for r in batch)
    stats.rows += len(rows)
    stats.requests += len(pairs)
    stats.seconds += time.perf_counter() - start
    return scores


# ---------------------------------------------------------------------------------------------------------------
# Parsing a generated answer

_ANSWER_PATTERNS = [
    r"^\s*[（(]?([ABCD])(?:$|[\s.．、:：)）。,，])",  # starts with the letter alone: "A", "A. ...", "(B)"
    r"答案(?:选项)?(?:应该|应)?(?:是|为)?\s*[:：]?\s*(?:选项)?\s*[（(]?([ABCD])(?![A-Za-z])",
    r"(?:故|所以)?(?:应)?选(?:择|项)?\s*[:：]?\s*[（(]?([ABCD])(?![A-Za-z])",
    r"(?<![A-Za-z])([ABCD])\s*(?:选项|项)?(?:是|为)?\s*正确",
    r"正确(?:的)?(?:选项|答案)?(?:是|为)\s*[:：]?\s*[（(]?([ABCD])(?![A-Za-z])",
]


def parse_choice(text: str) -> str | None:
    """The option letter a generated answer names, or None. Tries explicit answer phrases first, then a single
    letter standing alone (not inside a word); several different lone letters without a phrase are ambiguous."""
    text = text.strip().replace("Ａ", "A").replace("Ｂ", "B").replace("Ｃ", "C").replace("Ｄ", "D")
    for pattern in _ANSWER_PATTERNS:
        m = re.search(pattern, text, re.M)
        if m:
            return m.group(1)
    lone = set(re.findall(r"(?<![A-Za-z])([ABCD])(?![A-Za-z])", text))
    return lone.pop() if len(lone) == 1 else None


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class SubjectTask:
    """One subject to evaluate: its questions and the dev questions used as shots."""
    subject: str
    benchmark: str
    data: SubjectFile
    shots: list[Question] = field(default_factory=list)

    @property
    def name_zh(self) -> str:
        return subject_tables.chinese_name(self.subject, self.benchmark)


def evaluate_multiple_choice(lm: CausalLM, encoder, tasks: Sequence[SubjectTask], *, mode: str = "ppl",
                             batch_size: int = 32, max_batch_tokens: int = 32768,
                             max_new_tokens: int = 16, share_prefix: bool = True) -> dict:
    """Evaluate every task; returns the results dict (see `summarize`) with per-question records."""
    if mode not in ("ppl", "gen"):
        raise ValueError(f"unknown mode {mode!r}; use ppl or gen")
    stats = ScoreStats()
    records: dict[str, list[dict]] = {}
    start = time.perf_counter()
    if mode == "ppl":
        pairs, owners = [], []
        for task in tasks:
            for q in task.data.questions:
                context = ppl_context(task.name_zh, task.shots, q)
                for letter in LETTERS:
                    pairs.append(encode_pair(encoder, context, " " + letter))
                owners.append((task.subject, q))
        scores = score_continuations(lm, pairs, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                                     share_prefix=share_prefix, stats=stats)
        for k, (subject, q) in enumerate(owners):
            option_scores = scores[4 * k: 4 * k + 4]
            pred = LETTERS[max(range(4), key=lambda j: (option_scores[j], -j))]  # ties: the first, as np.argmax
            records.setdefault(subject, []).append(
                {"id": q.id, "answer": q.answer, "pred": pred, "correct": pred == q.answer,
                 "scores": option_scores})
    else:
        prompts, owners = [], []
        if max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1 in gen mode, got {max_new_tokens}")
        keep = lm.max_length - max_new_tokens  # long (k-shot) prompts are cut on the left to leave room to answer
        if keep < 1:
            raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room in the model's {lm.max_length} tokens")
        for task in tasks:
            for q in task.data.questions:
                prompt = encoder.chat_prompt_ids(chat_messages(task.name_zh, task.shots, q))
                stats.truncated += len(prompt) > keep
                prompts.append(prompt[-keep:])
                owners.append((task.subject, q))
        stop_ids = encoder.stop_ids()
        outputs = []
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        by_index = {}
        for at in range(0, len(order), batch_size):
            chunk = order[at: at + batch_size]
            for i, out in zip(chunk, lm.generate_greedy([prompts[i] for i in chunk], max_new_tokens, stop_ids)):
                by_index[i] = out
        outputs = [by_index[i] for i in range(len(prompts))]
        stats.requests = len(prompts)
        for (subject, q), out in zip(owners, outputs):
            text = encoder.decode(out)
            pred = parse_choice(text)
            records.setdefault(subject, []).append(
                {"id": q.id, "answer": q.answer, "pred": pred, "correct": pred == q.answer, "response": text,
                 "response_ids": list(out)})
    seconds = time.perf_counter() - start
    result = summarize(tasks, records, mode=mode)
    n_questions = sum(len(t.data.questions) for t in tasks)
    result["speed"] = {"seconds": seconds, "questions": n_questions,
                       "questions_per_second": n_questions / seconds if seconds > 0 else None,
                       "forward_rows": stats.rows, "forward_tokens": stats.tokens,
                       "truncated_contexts": stats.truncated}
    return result


def summarize(tasks: Sequence[SubjectTask], records: dict[str, list[dict]], *, mode: str) -> dict:
    benchmark = tasks[0].benchmark if tasks else "cmmlu"
    per_subject = {}
    for task in tasks:
        recs = records.get(task.subject, [])
        correct = sum(r["correct"] for r in recs)
        entry = {"name_zh": task.name_zh, "categories": subject_tables.subject_categories(task.subject, benchmark),
                 "questions": len(recs), "correct": correct,
                 "accuracy": correct / len(recs) if recs else None, "shots": len(task.shots),
                 "skipped_rows": dict(task.data.skipped)}
        if mode == "gen":
            entry["unparsed"] = sum(r["pred"] is None for r in recs)
        per_subject[task.subject] = entry
    scored = {s: e for s, e in per_subject.items() if e["accuracy"] is not None}
    categories = {}
    for category in subject_tables.category_names(benchmark):
        accs = [e["accuracy"] for e in scored.values() if category in e["categories"]]
        if accs:
            categories[category] = {"accuracy": sum(accs) / len(accs), "subjects": len(accs)}
    total = sum(e["questions"] for e in scored.values())
    return {
        "benchmark": benchmark,
        "mode": mode,
        "subjects": per_subject,
        "categories": categories,
        "average": sum(e["accuracy"] for e in scored.values()) / len(scored) if scored else None,
        "question_weighted_accuracy": sum(e["correct"] for e in scored.values()) / total if total else None,
        "questions": total,
        "skipped_rows": sum(sum(e["skipped_rows"].values()) for e in per_subject.values()),
        "records": records,
    }


def markdown_table(result: dict) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.2f}"

    lines = [f"## {result['benchmark']} ({result['mode']} mode)", "",
             "| subject | 科目 | categories | questions | skipped rows | accuracy (%) |",
             "|---|---|---|---:|---:|---:|"]
    for subject, e in result["subjects"].items():
        lines.append(f"| {subject} | {e['name_zh']} | {', '.join(e['categories']) or '-'} | {e['questions']} | "
                     f"{sum(e['skipped_rows'].values())} | {pct(e['accuracy'])} |")
    lines += ["", "| category | subjects | accuracy (%) |", "|---|---:|---:|"]
    for category, e in result["categories"].items():
        lines.append(f"| {category} | {e['subjects']} | {pct(e['accuracy'])} |")
    lines.append(f"| **average (over subjects)** | {len(result['subjects'])} | **{pct(result['average'])}** |")
    lines.append(f"| question-weighted | {result['questions']} questions | "
                 f"{pct(result['question_weighted_accuracy'])} |")
    return "\n".join(lines) + "\n"


def load_tasks(root, split: str, shots: int = 0, subjects: Sequence[str] | None = None,
               benchmark: str | None = None) -> list[SubjectTask]:
    """One SubjectTask per subject file of `root/split`; shots are the first `shots` questions of the dev split."""
    from tinyllm_mcore.evaluation.data import EvalDataError, detect_benchmark, list_subjects, read_questions, subject_file

    benchmark = benchmark or detect_benchmark(root)
    available = list_subjects(root, split, benchmark)
    if subjects:
        missing = [s for s in subjects if s not in available]
        if missing:
            raise EvalDataError(f"no {split} file for subject(s) {', '.join(missing)} in {root}")
    tasks = []
    for subject in subjects or available:
        data = read_questions(subject_file(root, subject, split, benchmark), subject)
        shot_questions: list[Question] = []
        if shots:
            dev = subject_file(root, subject, "dev", benchmark)
            if not dev.is_file():
                raise EvalDataError(f"{shots}-shot needs the dev split: {dev} not found")
            shot_questions = read_questions(dev, subject).questions[:shots]
            if len(shot_questions) < shots:  # running fewer shots than asked would report a different benchmark
                raise EvalDataError(f"--shots {shots}: {dev} has only {len(shot_questions)} usable question(s)")
        tasks.append(SubjectTask(subject, benchmark, data, shot_questions))
    return tasks
