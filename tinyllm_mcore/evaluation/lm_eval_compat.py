"""Run lm-evaluation-harness on the same local CMMLU-format CSVs, as an independent cross-check of ppl mode.

`write_task_yamls` describes each subject as an lm-eval task over the local files (``dataset_path: csv``), with
lm-eval's own CMMLU template — which is ours (see multiple_choice.py): description = our header, doc_to_text = our
question text, choices " A".." D" after the default target delimiter " ", shots = the first k dev rows joined by the
default "\\n\\n". `run_lm_eval` evaluates an HF directory with lm-eval's ``hf`` model and returns per-question choices
and option log-likelihoods in our record order. Needs ``pip install "lm-eval>=0.4,<0.5"`` (the ``eval`` extra).

Known difference: lm-eval puts the CSV's option cells into the prompt as they are, our reader strips surrounding
whitespace (the question is stripped by both), so the prompts differ for cells with leading/trailing spaces.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from tinyllm_mcore.evaluation.subjects import chinese_name


def task_name(subject: str) -> str:
    return f"tinyllm_cmmlu_{subject}"


def write_task_yamls(benchmark_dir: str | Path, subjects: Sequence[str], out_dir: str | Path,
                     split: str = "test") -> list[str]:
    benchmark_dir, out_dir = Path(benchmark_dir).resolve(), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for subject in subjects:
        files = {"test": str(benchmark_dir / split / f"{subject}.csv")}
        if (benchmark_dir / "dev" / f"{subject}.csv").is_file():
            files["dev"] = str(benchmark_dir / "dev" / f"{subject}.csv")
        task = {
            "task": task_name(subject),
            "dataset_path": "csv",
            "dataset_kwargs": {"data_files": files},
            "test_split": "test",
            "output_type": "multiple_choice",
            "description": f"以下是关于{chinese_name(subject, 'cmmlu')}的单项选择题，请直接给出正确答案的选项。\n\n",
            "doc_to_text": "{{Question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\n答案：",
            "doc_to_choice": ["A", "B", "C", "D"],
            "doc_to_target": "{{['A', 'B', 'C', 'D'].index(Answer)}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }
        if "dev" in files:
            task.update(fewshot_split="dev", fewshot_config={"sampler": "first_n"})
        # JSON is YAML: no PyYAML quoting questions for the Chinese text and newlines
        (out_dir / f"{task_name(subject)}.yaml").write_text(json.dumps(task, ensure_ascii=False, indent=1),
                                                            encoding="utf-8")
        names.append(task_name(subject))
    return names


def run_lm_eval(hf_dir: str | Path, benchmark_dir: str | Path, subjects: Sequence[str], *, shots: int = 0,
                batch_size: int = 8, work_dir: str | Path, split: str = "test") -> dict:
    """{subject: [{"pred": letter, "scores": [4 log-likelihoods]}, ...]} in CSV row order, from lm-eval."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    names = write_task_yamls(benchmark_dir, subjects, Path(work_dir) / "tasks", split)
    output = evaluator.simple_evaluate(
        model="hf", model_args={"pretrained": str(hf_dir), "dtype": "float32"}, tasks=names,
        num_fewshot=shots, batch_size=batch_size, device="cpu", log_samples=True,
        task_manager=TaskManager(include_path=str(Path(work_dir) / "tasks")))
    result = {}
    for subject, name in zip(subjects, names):
        samples = sorted(output["samples"][name], key=lambda s: s["doc_id"])
        records = []
        for sample in samples:
            scores = [float(r[0]) for r in sample["filtered_resps"]]
            records.append({"pred": "ABCD"[max(range(4), key=lambda j: (scores[j], -j))], "scores": scores})
        result[subject] = records
    return result
