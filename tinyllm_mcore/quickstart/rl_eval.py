"""Score HF exports on the RL quickstart's held-out problems with transformers' greedy decoding.

`python -m tinyllm_mcore.quickstart.rl_eval --eval-data eval.jsonl --model NAME=HF_DIR ... --output-json F`

Each model answers every ``{"question", "answer"}`` line of ``--eval-data`` through its exported chat template
(``apply_chat_template`` with an empty system turn, as the quickstart trained) and ``generate(do_sample=False)``;
an answer is right when the last integer in it equals ``answer`` (data.verifiable_prompts.last_integer_correct).
Only transformers and the exported files are used, so the numbers are what a user of the export gets.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tinyllm_mcore.data.verifiable_prompts import last_integer_correct
from tinyllm_mcore.runtime.files import atomic_write_text


def read_eval(path: Path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                records.append({"question": str(record["question"]), "answer": int(record["answer"])})
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{number}: expected {{\"question\": str, \"answer\": int}} ({e})") from None
    if not records:
        raise ValueError(f"{path}: no held-out problems")
    return records


def greedy_answers(hf_dir: str, questions: list[str], max_new_tokens: int, batch_size: int = 64) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokenizer.padding_side = "left"  # a batch's prompts end where generation starts
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    for start in range(0, len(questions), batch_size):
        prompts = [tokenizer.apply_chat_template([{"role": "system", "content": ""}, {"role": "user", "content": q}],
                                                 tokenize=True, add_generation_prompt=True)
                   for q in questions[start:start + batch_size]]
        prompts = [p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p for p in prompts]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        answers += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return answers


def score(hf_dir: str, records: list[dict], max_new_tokens: int) -> dict:
    answers = greedy_answers(hf_dir, [r["question"] for r in records], max_new_tokens)
    right = [last_integer_correct(a, r["answer"]) for a, r in zip(answers, records)]
    return {"hf_dir": hf_dir, "accuracy": sum(right) / len(records), "correct": sum(right), "total": len(records),
            "samples": [{"question": r["question"], "answer": r["answer"], "response": a, "correct": ok}
                        for r, a, ok in zip(records[:8], answers, right)]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tinyllm_mcore.quickstart.rl_eval", allow_abbrev=False,
                                description=__doc__.splitlines()[0])
    p.add_argument("--eval-data", required=True, help='held-out {"question", "answer"} jsonl')
    p.add_argument("--model", action="append", required=True, metavar="NAME=HF_DIR", help="an HF export to score")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--output-json", required=True)
    args = p.parse_args(argv)
    try:
        records = read_eval(Path(args.eval_data))
        models = {}
        for spec in args.model:
            name, sep, hf_dir = spec.partition("=")
            if not sep or not name or not Path(hf_dir, "config.json").is_file():
                raise ValueError(f"--model {spec}: expected NAME=HF_DIR with an HF export (config.json) in HF_DIR")
            models[name] = hf_dir
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = {}
    for name, hf_dir in models.items():
        result[name] = score(hf_dir, records, args.max_new_tokens)
        print(f"[rl_eval] {name}: held-out accuracy {result[name]['accuracy']:.1%} "
              f"({result[name]['correct']}/{len(records)}, transformers greedy, last integer = answer)", flush=True)
    atomic_write_text(Path(args.output_json), json.dumps(result, ensure_ascii=False, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
