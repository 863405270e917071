"""The quickstart pipeline: every stage of the project, run for real on a tiny model, each as a subprocess.

    corpus -> tokenizer -> preprocess (pretrain, sft, preference) -> pretrain (TP2, 2 gloo processes via torchrun)
           -> SFT (TP2) -> DPO (TP2) -> reward model (TP2, trunk from SFT)
           -> held-out evaluation (pretrained / SFT / DPO answers, DPO's implicit reward and the reward model on
              held-out preference pairs) -> HF export (DPO) -> chat (HF)

Each step runs the project's own CLI as a subprocess of the installed package (`python -m
tinyllm_mcore.cli.train_tokenizer`, `torchrun -m tinyllm_mcore.stages.pretrain`, ...) with its output in
``RUN/logs/NN_step.log``; the console shows the step, its command and its progress lines. A failing step ends the run
with one line naming the step and its log, and a non-zero exit. At the end ``RUN/report.md`` gathers metrics, timings,
loss curves and artifact paths (see report.py).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from tinyllm_mcore.runtime.files import atomic_write_text, free_port


MARKER = ".tinyllm_quickstart"  # marks a folder the quickstart made (only such a folder is ever wiped)


@dataclass
class Settings:
    """Model and schedule. The defaults are tuned so that, on held-out questions, SFT answers the facts (>= 90%) in
    either style, DPO moves the answers to the preferred style (>= 90%) with the facts intact and the reward model
    ranks >= 90% of held-out pairs right, within the quickstart's budget on 2 CPU cores; `fast()` is a smoke variant
    (same pipeline, fewer steps)."""
    model_size: str = "16m"
    tensor_parallel: int = 2
    vocab_size: int | None = None  # None: character level, see tokenizer_vocab_size()
    seq_length: int = 128
    pretrain_iters: int = 400
    pretrain_lr: float = 2e-3
    sft_iters: int = 150
    sft_lr: float = 1e-3
    dpo_iters: int = 60
    dpo_lr: float = 1e-4
    # β 1 (not the seed's 0.1): the loss saturates once chosen leads rejected by a few nats, enough to flip the
    # greedy answer's style; at 0.1 DPO keeps pushing the rejected answers down until the facts' own tokens suffer
    dpo_beta: float = 1.0
    reward_iters: int = 150
    reward_lr: float = 3e-4
    micro_batch_size: int = 16
    dpo_micro_batch_size: int = 8
    log_interval: int = 10
    eval_interval: int = 100
    eval_limit: int | None = None  # held-out questions scored per checkpoint (None: all)
    chat_questions: int = 6
    seed: int = 1234

    @classmethod
    def fast(cls) -> "Settings":
        return cls(pretrain_iters=40, sft_iters=30, dpo_iters=10, reward_iters=10, log_interval=5, eval_interval=20,
                   eval_limit=48, chat_questions=3)


class StepFailed(RuntimeError):
    def __init__(self, step: str, log: Path, detail: str):
        super().__init__(f"quickstart failed at step '{step}' ({detail}); see {log}")
        self.step, self.log = step, log


@dataclass
class StepResult:
    name: str
    seconds: float
    log: str
    command: str


@dataclass
class Run:
    """A run folder and what happened in it (serialized to RUN/run.json for the report)."""
    root: Path
    settings: Settings
    corpus: str | None = None
    corpus_used: dict | None = None  # what --corpus contributed (see read_user_corpus)
    steps: list[StepResult] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def save(self) -> None:
        state = {"settings": dataclasses.asdict(self.settings), "corpus": self.corpus, "corpus_used": self.corpus_used,
                 "steps": [dataclasses.asdict(s) for s in self.steps], "started": self.started}
        atomic_write_text(self.path("run.json"), json.dumps(state, ensure_ascii=False, indent=1))


# ---------------------------------------------------------------------------------------------------------------
# Running one step


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    env["PYTHONUNBUFFERED"] = "1"
    return env


# Lines worth echoing to the console (the rest stays in the log): stage progress, summaries, errors.
_PROGRESS = re.compile(r"^(\[(pretrain|sft|dpo|reward|grpo|qa|rl_eval|mcore_to_hf)\]|wrote |documents:|tokens:|skipped lines|error|"
                       r"<\|user\|>|<\|assistant\|>|saved checkpoint|loaded )")


_EXCEPTION = re.compile(r"^(\[rank\d+\]: )?[A-Za-z_.]*(Error|Exception|Interrupt)\b.*:")


def run_step(run: Run, name: str, argv: list[str], *, echo: bool = True) -> StepResult:
    index = len(run.steps) + 1
    log = run.logs / f"{index:02d}_{name}.log"
    command = shlex.join(argv)
    print(f"\n==> [{index}] {name}\n    $ {command}\n    log: {log}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        f.write(f"$ {command}\n")
        f.flush()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(), cwd=run.root,
                                text=True, encoding="utf-8", errors="replace", bufsize=1)
        try:
            for line in proc.stdout:
                f.write(line)
                if echo and _PROGRESS.match(line):
                    print("    " + line.rstrip(), flush=True)
            returncode = proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
    seconds = time.perf_counter() - t0
    if returncode != 0:
        lines = [l for l in log.read_text(encoding="utf-8", errors="replace").splitlines() if l.strip()]
        # the CLIs' one-line reports of bad input, else the first exception raised in a worker
        errors = [l for l in lines if l.startswith("error:")] or [l for l in lines if _EXCEPTION.match(l)][:1]
        print("    " + "\n    ".join(errors[-1:] or lines[-8:]), file=sys.stderr)
        raise StepFailed(name, log, f"exit status {returncode}")
    print(f"    done in {seconds:.1f} s", flush=True)
    result = StepResult(name, round(seconds, 2), str(log.relative_to(run.root)), command)
    run.steps.append(result)
    run.save()
    return result


def exit_status(run) -> int:
    """A quickstart command's exit status: `run()` to completion 0; a failed step, bad input or Ctrl-C one `error:`
    line (1, 2, 130)."""
    try:
        run()
    except StepFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


def check_steps_import_this_package() -> None:
    """The steps are `python -m tinyllm_mcore...` subprocesses run from the run folder, so they import the installed
    package: refuse to start when that is missing or is another copy than the one running (a checkout used without
    `pip install -e .`, or next to an install of a different checkout)."""
    import tempfile

    import tinyllm_mcore

    here = Path(tinyllm_mcore.__file__).resolve().parent
    probe = subprocess.run(python("-c", "import importlib.util as u; s = u.find_spec('tinyllm_mcore'); "
                                        "print(s.origin if s else '')"),
                           cwd=tempfile.gettempdir(), env=_env(), capture_output=True, text=True)
    found = probe.stdout.strip()
    if not found or Path(found).resolve().parent != here:
        where = f"import tinyllm_mcore from {Path(found).parent}" if found else "cannot import tinyllm_mcore"
        raise ValueError(f"the quickstart's steps are subprocesses, which {where} (this is {here}): "
                         f"run `pip install -e .` in {here.parent}")


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def torchrun(nproc: int, module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", module, *args]


# ---------------------------------------------------------------------------------------------------------------
# The pipeline


def prepare_run_dir(root: Path, overwrite: bool) -> None:
    if root.exists() and any(root.iterdir()):
        if not (root / MARKER).exists():
            raise FileExistsError(f"{root} exists and was not made by the quickstart; choose another --output-dir")
        if not overwrite:
            raise FileExistsError(f"{root} holds an earlier quickstart run; pass --overwrite or another --output-dir")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("made by python -m tinyllm_mcore.quickstart\n")
    for folder in ("logs", "metrics", "tensorboard", "checkpoints", "data"):
        (root / folder).mkdir()


def write_corpus(run: Run, corpus: str | None) -> dict[str, Path]:
    """The synthetic knowledge corpus; with `corpus`, the pretraining documents are the user's text mixed with the
    synthetic fact documents (so the held-out fact questions still measure what the model learnt on top of it)."""
    from tinyllm_mcore.quickstart.corpus import build_corpus, write_jsonl

    t0 = time.perf_counter()
    what = f"user text from {corpus} + synthetic fact documents" if corpus else \
        "synthetic Chinese knowledge corpus, generated in-process"
    print(f"\n==> [1] corpus ({what})", flush=True)
    knowledge = build_corpus(seed=run.settings.seed)
    paths = knowledge.write(run.path("corpus"))
    pretrain = knowledge.pretrain
    if corpus:
        user_docs, run.corpus_used = read_user_corpus(corpus, budget_chars=sum(len(d["text"]) for d in pretrain))
        pretrain = mix_documents(user_docs, pretrain, seed=run.settings.seed)
        write_jsonl(paths["pretrain"], pretrain)
        write_jsonl(paths["tokenizer"], knowledge.tokenizer_text(pretrain))  # the tokenizer covers the real text too
        u = run.corpus_used
        print(f"    --corpus {corpus}: {u['documents']} documents ({u['characters']:,} characters) from "
              f"{len(u['sources'])} source file(s){', stopped at the budget' if u['truncated'] else ', all of it'}; "
              f"mixed with {len(knowledge.pretrain)} synthetic fact documents", flush=True)
    print(f"    {len(knowledge.countries)} countries x 6 facts ({len(knowledge.unseen)} only in pretraining, "
          f"{len(knowledge.no_preference)} in SFT but in no preference pair); {len(pretrain)} pretraining documents, "
          f"{len(knowledge.sft)} SFT pairs (both answer styles), {len(knowledge.preference)} DPO pairs, "
          f"{len(knowledge.eval)} held-out questions, {len(knowledge.eval_pairs)} held-out preference pairs -> "
          f"{run.path('corpus')}", flush=True)
    run.steps.append(StepResult("corpus", round(time.perf_counter() - t0, 2), "", "build_corpus(seed)"))
    run.save()
    return paths


def read_user_corpus(corpus: str, budget_chars: int) -> tuple[list[dict], dict]:
    """Stream `corpus` with the project's corpus reader (every input tools/preprocess_data.py takes: jsonl, jsonl.gz,
    parquet, folders and globs of them, a `datasets` save_to_disk folder) and keep its "text" documents up to
    `budget_chars` characters: the quickstart pretrains on well under a million tokens, so reading stops there.
    Returns (documents, what was used)."""
    from tinyllm_mcore.data.corpus import expand_inputs, iter_texts

    try:
        sources = expand_inputs(corpus)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--corpus {corpus}: {e}") from None
    docs, characters, truncated = [], 0, False
    try:
        for text in iter_texts(sources, json_key="text"):
            text = text[:budget_chars - characters]
            docs.append({"text": text})
            characters += len(text)
            if characters >= budget_chars:
                truncated = True
                break
    except (OSError, EOFError, ValueError, zlib.error) as e:  # e.g. a damaged .gz
        raise ValueError(f"--corpus {corpus}: cannot read it ({e})") from None
    if not docs:
        raise ValueError(f"--corpus {corpus}: no document with a non-empty \"text\" field")
    return docs, {"path": str(corpus), "sources": [str(p) for p in sources], "documents": len(docs),
                  "characters": characters, "truncated": truncated, "budget_characters": budget_chars}


def mix_documents(user_docs: list[dict], synthetic_docs: list[dict], seed: int) -> list[dict]:
    import random

    mixed = user_docs + synthetic_docs
    random.Random(seed).shuffle(mixed)
    return mixed


def tokenizer_vocab_size(tokenizer_text: Path) -> int:
    """A character-level vocabulary: every character of the text, SentencePiece's specials, the 4 chat role markers,
    256 byte-fallback pieces and 8 merges. A tiny model then sees a held-out wording spelled with the same tokens as
    the training wordings (a larger BPE vocabulary merges whole training phrases such as "国的首都是" into single
    tokens, which held-out phrasings never produce)."""
    chars: set[str] = set()
    with open(tokenizer_text, encoding="utf-8") as f:
        for line in f:
            chars.update(json.loads(line).get("text", ""))
    chars.discard("\n")
    return len(chars) + 3 + 4 + 256 + 1 + 8


def training_args(run: Run, stage: str, *, iters: int, lr: float, micro_batch_size: int) -> list[str]:
    s = run.settings
    return [
        "--model-size", s.model_size, "--tensor-model-parallel-size", str(s.tensor_parallel),
        "--tokenizer-model", str(run.path("tokenizer")), "--seq-length", str(s.seq_length),
        "--micro-batch-size", str(micro_batch_size), "--train-iters", str(iters), "--lr", str(lr),
        "--min-lr", str(lr / 10), "--split", "95,5,0", "--eval-interval", str(min(s.eval_interval, iters)),
        "--eval-iters", "2", "--log-interval", str(s.log_interval), "--seed", str(s.seed),
        "--save", str(run.path("checkpoints", stage)),
        "--tensorboard-dir", str(run.path("tensorboard", stage)),
        "--metrics-jsonl", str(run.path("metrics", f"{stage}.jsonl")),
    ]


def prepare_data(run: Run, corpus: str | None) -> dict[str, Path]:
    """Corpus -> tokenizer -> indexed datasets (pretrain, sft, preference) under RUN/data; returns the corpus paths."""
    paths = write_corpus(run, corpus)
    train_tokenizer(run, paths)
    for name in ("pretrain", "sft", "dpo"):
        preprocess(run, paths, name)
    return paths


def train_tokenizer(run: Run, paths: dict[str, Path]) -> None:
    run_step(run, "tokenizer", python(
        "-m", "tinyllm_mcore.cli.train_tokenizer", "--input", str(paths["tokenizer"]), "--output-dir", str(run.path("tokenizer")),
        "--vocab-size", str(run.settings.vocab_size or tokenizer_vocab_size(paths["tokenizer"])),
        "--character-coverage", "1.0"))


def preprocess(run: Run, paths: dict[str, Path], name: str) -> None:
    """One corpus file (pretrain, sft or dpo) -> RUN/data/NAME_*_document.bin/.idx."""
    mode = {"pretrain": "pretrain", "sft": "sft", "dpo": "preference"}[name]
    run_step(run, f"preprocess_{name}", python(
        "-m", "tinyllm_mcore.cli.preprocess_data", "--mode", mode, "--input", str(paths[name]),
        "--output-prefix", str(run.path("data", name)), "--tokenizer-model", str(run.path("tokenizer")),
        "--append-eod", "--no-progress"))


def run_pipeline(output_dir: str, settings: Settings, corpus: str | None = None, overwrite: bool = False) -> Path:
    from tinyllm_mcore.quickstart import report

    root = Path(output_dir).resolve()
    check_steps_import_this_package()
    prepare_run_dir(root, overwrite)
    run = Run(root, settings, corpus)
    s = settings
    tp = s.tensor_parallel
    data = run.path("data")
    print(f"tinyllm-mcore quickstart -> {root}\n{s}", flush=True)

    paths = prepare_data(run, corpus)
    pretrain_ckpt, sft_ckpt, dpo_ckpt = (run.path("checkpoints", n) for n in ("pretrain", "sft", "dpo"))

    run_step(run, "pretrain", torchrun(tp, "tinyllm_mcore.stages.pretrain", *training_args(
        run, "pretrain", iters=s.pretrain_iters, lr=s.pretrain_lr, micro_batch_size=s.micro_batch_size),
        "--data-path", str(data / "pretrain_text_document")))
    run_step(run, "sft", torchrun(tp, "tinyllm_mcore.stages.sft", *training_args(
        run, "sft", iters=s.sft_iters, lr=s.sft_lr, micro_batch_size=s.micro_batch_size),
        "--load", str(pretrain_ckpt), "--finetune", "--sft-data", str(data / "sft_sft_document")))
    run_step(run, "dpo", torchrun(tp, "tinyllm_mcore.stages.dpo", *training_args(
        run, "dpo", iters=s.dpo_iters, lr=s.dpo_lr, micro_batch_size=s.dpo_micro_batch_size),
        "--load", str(sft_ckpt), "--finetune", "--preference-data", str(data / "dpo_preference_document"),
        "--beta", str(s.dpo_beta)))
    run_step(run, "reward", torchrun(tp, "tinyllm_mcore.stages.reward", *training_args(
        run, "reward", iters=s.reward_iters, lr=s.reward_lr, micro_batch_size=s.dpo_micro_batch_size),
        "--init-from", str(sft_ckpt), "--preference-data", str(data / "dpo_preference_document")))

    eval_data, eval_pairs = paths["eval"], paths["eval_pairs"]
    if s.eval_limit:  # a deterministic subset, spread over the file (every split), and the pairs of its questions
        records = eval_data.read_text(encoding="utf-8").splitlines()
        step = max(len(records) // s.eval_limit, 1)
        subset = records[::step][:s.eval_limit]
        eval_data = run.path("corpus", "eval_subset.jsonl")
        eval_data.write_text("\n".join(subset) + "\n", encoding="utf-8")
        questions = {json.loads(r)["question"] for r in subset}
        eval_pairs = run.path("corpus", "eval_pairs_subset.jsonl")
        pairs = paths["eval_pairs"].read_text(encoding="utf-8").splitlines()
        eval_pairs.write_text("".join(line + "\n" for line in pairs if json.loads(line)["prompt"] in questions),
                              encoding="utf-8")
    run_step(run, "evaluate", python(
        "-m", "tinyllm_mcore.quickstart.qa", "mcore", "--tokenizer-model", str(run.path("tokenizer")),
        "--eval-data", str(eval_data), "--checkpoint", f"pretrained={pretrain_ckpt}",
        "--checkpoint", f"sft={sft_ckpt}", "--checkpoint", f"dpo={dpo_ckpt}", "--eval-pairs", str(eval_pairs),
        "--dpo-policy", "dpo", "--dpo-reference", "sft", "--beta", str(s.dpo_beta),
        "--reward-model", str(run.path("checkpoints", "reward")), "--seq-length", str(s.seq_length),
        "--output-json", str(run.path("eval.json"))))
    run_step(run, "export_hf", python(
        "-m", "tinyllm_mcore.cli.mcore_to_hf", "--load", str(dpo_ckpt), "--save", str(run.path("hf")),
        "--tokenizer-model", str(run.path("tokenizer")), "--quiet"))
    run_step(run, "chat", python(
        "-m", "tinyllm_mcore.quickstart.qa", "hf", "--hf", str(run.path("hf")), "--eval-data", str(paths["eval"]),
        "--num-questions", str(s.chat_questions), "--output-json", str(run.path("chat.json"))))

    report_path = report.write_report(run.root)
    print(f"\nreport: {report_path}", flush=True)
    print(report.summary_line(run.root), flush=True)
    return report_path
