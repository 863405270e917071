"""Chat with an mcore checkpoint in the seed's chat format, streaming the answer as it is generated.

    python tools/chat.py --load sft_ckpt --tokenizer-model tok               # REPL, multi-turn
    python tools/chat.py --load sft_ckpt --tokenizer-model tok --prompt "你好"   # one answer, then exit

REPL commands: /reset clears the history, /exit (or EOF) quits. The history is sent back every turn
(<|system|> ... <|user|> q1 <|assistant|> a1 <eos> <|user|> q2 <|assistant|>); when it outgrows the model's context
the oldest turns are dropped. Answers print token by token, then a `[N tokens, X tokens/s]` line. A message that
cannot fit the context gets one `error:` line and the session goes on. At TP > 1 launch with torchrun; rank 0 reads
stdin and broadcasts each line.

The same command, three spellings: `tinyllm-chat` (installed by pip),
`python -m tinyllm_mcore.cli.chat`, `python tools/chat.py` (in a checkout).
"""
from __future__ import annotations

import argparse
import sys
import time

from tinyllm_mcore.inference import generate as inference
from tinyllm_mcore.runtime.quiet import add_verbose_flag


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    inference.add_generation_args(p)
    p.add_argument("--prompt", default=None, help="answer this one message and exit")
    add_verbose_flag(p)
    return p


class ChatSession:
    """Multi-turn history + streamed answers."""

    def __init__(self, tokenizer, generator, params, system=None, out=sys.stdout):
        self.tokenizer, self.generator, self.params, self.system, self.out = tokenizer, generator, params, system, out
        self.history: list[dict] = []

    def prompt_ids(self, message: str) -> list[int]:
        turns = self.history + [{"role": "user", "content": message}]
        room = self.generator.max_sequence_length - self.params.max_new_tokens
        ids = self.tokenizer.chat_prompt_ids(turns, system=self.system)
        while len(ids) > room and len(turns) > 1:  # drop the oldest question/answer pair
            turns = turns[2:]
            ids = self.tokenizer.chat_prompt_ids(turns, system=self.system)
        if len(ids) > room:
            raise ValueError(f"message of {len(ids)} tokens does not fit the model's "
                             f"{self.generator.max_sequence_length}-token context with --max-new-tokens "
                             f"{self.params.max_new_tokens}: shorten it or lower --max-new-tokens")
        return ids

    def answer(self, message: str, echo: bool = True, prefix: str = "") -> str:
        """Stream the answer to `out` (after `prefix`), then a tokens/s line; raises ValueError, before printing
        anything, for a message that cannot fit the context."""
        from tinyllm_mcore.runtime import distributed as rt

        ids = self.prompt_ids(message)
        streamer = inference.TextStreamer(self.tokenizer)
        stops = set(self.params.stop_ids)
        show = echo and rt.is_logging_rank()
        self._write(prefix if show else "")
        start, count = time.perf_counter(), 0
        for step in self.generator.stream([ids], self.params):
            token = step[0]
            if token is None:
                continue
            count += 1
            if token in stops:
                continue
            delta = streamer.push(token)
            if show:
                self._write(delta)
        seconds = time.perf_counter() - start
        if show:
            self._write(f"\n[{count} tokens, {count / seconds:.1f} tokens/s]\n")
        answer = self.tokenizer.detokenize(streamer.ids, skip_special_tokens=True)
        self.history += [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]
        return answer

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()


def _read_line(prompt: str) -> str | None:
    """Rank 0 reads a line; every rank gets it (None at EOF)."""
    from tinyllm_mcore.runtime import distributed as rt

    def read() -> str | None:
        try:
            return input(prompt)
        except EOFError:
            return None

    return rt.on_rank0_then_share(read)


def run(args, out=sys.stdout) -> ChatSession:
    tokenizer, generator = inference.generator_from_args(args)
    params = inference.sampling_from_args(args, inference.chat_stop_ids(tokenizer))
    session = ChatSession(tokenizer, generator, params, system=args.system, out=out)
    if args.prompt is not None:
        session.answer(args.prompt)
        return session
    while True:
        line = _read_line("用户> ")
        if line is None or line.strip() == "/exit":
            return session
        if line.strip() == "/reset":
            session.history.clear()
            continue
        if line.strip():
            try:
                session.answer(line, prefix="助手> ")
            except ValueError as e:  # a message too long for the context: say so, keep the session
                from tinyllm_mcore.runtime import distributed as rt

                if rt.is_logging_rank():
                    print(f"error: {e}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    from tinyllm_mcore.cli.errors import run_cli

    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())
