"""Small CMMLU- and C-Eval-format CSV folders written by the tests themselves (no shared data needed)."""
from __future__ import annotations

import csv
import random
from pathlib import Path

from tests.harness.text_data import random_text

LETTERS = "ABCD"


def random_questions(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"Question": random_text(rng, 5, 30), **{l: random_text(rng, 1, 8) for l in LETTERS},
             "Answer": rng.choice(LETTERS)} for _ in range(n)]


def write_cmmlu_csv(path: Path, questions: list[dict], extra_rows: list[list[str]] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
        for i, q in enumerate(questions):
            w.writerow([i, q["Question"], q["A"], q["B"], q["C"], q["D"], q["Answer"]])
        for row in extra_rows:
            w.writerow(row)
    return path


def write_cmmlu_dir(root: Path, subjects: dict[str, int], dev: int = 5, seed: int = 0) -> Path:
    """{subject: test questions}; every subject also gets `dev` dev questions."""
    for k, (subject, n) in enumerate(subjects.items()):
        write_cmmlu_csv(root / "test" / f"{subject}.csv", random_questions(n, seed * 1000 + 2 * k))
        write_cmmlu_csv(root / "dev" / f"{subject}.csv", random_questions(dev, seed * 1000 + 2 * k + 1))
    return root


def make_tiny_hf_model(out_dir: Path, init_std: float = 0.3, seed: int = 0) -> Path:
    """A random tiny-preset HF directory (LlamaForCausalLM as the exporter writes it) with the tests' tiny
    tokenizer. A wide init makes option scores differ clearly (a 0.02-std model scores everything nearly alike)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.harness.text_data import tiny_tokenizer
    from tinyllm_mcore.convert.hf_config import hf_config
    from tinyllm_mcore.tokenizer.hf_folder import write_tokenizer_folder
    from tinyllm_mcore.model.presets import get_preset

    tokenizer = tiny_tokenizer()
    config = hf_config(get_preset("tiny", vocab_size=tokenizer.vocab_size))
    config["initializer_range"] = init_std
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    model.save_pretrained(out_dir)
    write_tokenizer_folder(tokenizer, out_dir)
    return out_dir
