"""cli.generate and cli.chat in-process on the SFT checkpoint: one-shot, batches, multi-turn history, streaming,
and one-line errors; `python tools/generate.py` and `python tools/chat.py` as scripts."""
import io
import json
import re
import subprocess

from tests.cli.checkout_scripts import ENV, tool_command
from tests.harness import post_training_data as data
from tinyllm_mcore.cli import chat, generate


def flags():
    return ["--load", str(data.checkpoints()["sft"]), "--tokenizer-model", data.tokenizer_path(), "--greedy",
            "--max-new-tokens", "24", "--system", ""]


def test_generate_answers_trained_questions(capsys):
    from tinyllm_mcore.runtime import distributed as rt

    records = data.corpus().sft[:8]
    try:
        texts = generate.run(generate.build_parser().parse_args(
            flags() + ["--chat", "--json"] + sum((["--prompt", r["question"]] for r in records), [])))
    finally:
        rt.destroy()
    # the CLI answers as the library does (greedy, chat format), and the SFT model knows most trained facts
    library = data.answer_questions(data.checkpoints()["sft"], [r["question"] for r in records])
    assert [t.strip() for t in texts] == [t.strip() for t in library]
    assert sum(data.accepted_answer(text, r) for text, r in zip(texts, records, strict=True)) >= 5, texts
    assert texts[0] in capsys.readouterr().out


class Writes(io.StringIO):
    """Records every write: streaming shows as many small writes before the tokens/s line."""

    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write(self, text):
        self.writes.append(text)
        return super().write(text)


def test_chat_streams_keeps_history_and_survives_an_overlong_message(monkeypatch, capsys):
    from tinyllm_mcore.runtime import distributed as rt

    records = data.corpus().sft[:2]
    # the first turn's answer, as one-shot greedy generation gives it (later turns carry the history)
    first = data.answer_questions(data.checkpoints()["sft"], [records[0]["question"]])[0]
    overlong = "".join(r["question"] for r in data.corpus().sft) * 4  # far beyond the tiny model's 256 positions
    lines = iter([records[0]["question"], overlong, records[1]["question"], "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    out = Writes()
    try:
        session = chat.run(chat.build_parser().parse_args(flags()), out=out)
        streamed = out.getvalue()
        history = [m["content"] for m in session.history]
        assert history[0::2] == [records[0]["question"], records[1]["question"]]
        assert history[1] == first and first and history[3]
        assert history[1] in streamed and history[3] in streamed
        # the answer arrives piece by piece, then one tokens/s line per answer
        first_stats = next(i for i, w in enumerate(out.writes) if "tokens/s]" in w)
        assert first_stats >= 3 and "".join(out.writes[:first_stats]) == "助手> " + first  # prefix + 2+ pieces
        assert len(re.findall(r"\n\[\d+ tokens, [\d.]+ tokens/s\]\n", streamed)) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith("error: message of") and "--max-new-tokens" in errors[0]
        # the second turn's prompt carries the first exchange
        ids = session.prompt_ids("x")
        assert data.tokenizer().detokenize(ids).count("<|assistant|>") == 3
    finally:
        rt.destroy()


def test_cli_errors(tmp_path, capsys):
    assert generate.main(["--load", str(tmp_path / "nope"), "--tokenizer-model", data.tokenizer_path(),
                          "--prompt", "x"]) == 2
    assert "error:" in capsys.readouterr().err
    other = tmp_path / "other_tok"
    from tinyllm_mcore.tokenizer.training import train_tokenizer

    corpus = data.corpus().write(tmp_path / "c")
    train_tokenizer(str(corpus["tokenizer"]), other, vocab_size=900, character_coverage=1.0, num_threads=1,
                    hard_vocab_limit=False)
    assert generate.main(["--load", str(data.checkpoints()["sft"]), "--tokenizer-model", str(other),
                          "--prompt", "x"]) == 2
    assert "-token vocabulary and this run's tokenizer" in capsys.readouterr().err


def test_generate_and_chat_run_as_scripts(tmp_path):
    """`python tools/generate.py` and `python tools/chat.py --prompt` (the checkout scripts, run side by side from a
    scratch directory) answer a trained question as the library does."""
    question = data.corpus().sft[0]["question"]
    expected = data.answer_questions(data.checkpoints()["sft"], [question])[0]
    procs = [subprocess.Popen(tool_command(name, *flags(), *extra, "--prompt", question), cwd=tmp_path, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, extra in (("generate", ["--chat", "--json"]), ("chat", []))]
    (generated, generate_err), (chatted, chat_err) = (p.communicate(timeout=300) for p in procs)
    assert [p.returncode for p in procs] == [0, 0], generate_err + chat_err
    assert json.loads(generated.strip().splitlines()[-1])["completion"].strip() == expected.strip()
    answer, stats = chatted.rstrip("\n").rsplit("\n", 1)
    assert answer.strip() == expected.strip() and re.fullmatch(r"\[\d+ tokens, [\d.]+ tokens/s\]", stats), chatted
