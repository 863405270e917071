"""When a run should save and stop early: a signal (Slurm's warning before the time limit, a requeue, an
operator's `kill -TERM`) or a wall-clock budget — Megatron-LM's --exit-signal-handler and --exit-duration-in-mins.

A signal reaches the ranks at different moments (or only some of them), so the handler only records it; at the end
of every iteration all ranks agree through one all-reduce, then all of them save the same iteration and exit 0.
"""
from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist


class ExitConditions:
    def __init__(self, signal_name: str | None, duration_minutes: float | None):
        self.start = time.monotonic()
        self.duration_s = duration_minutes * 60 if duration_minutes else None
        self.signal_name = signal_name
        self.received = False
        self._previous = None
        if signal_name:
            self._signum = getattr(signal, signal_name)
            self._previous = signal.signal(self._signum, self._record)

    @classmethod
    def from_args(cls, args) -> "ExitConditions":
        return cls(args.exit_signal if args.exit_signal_handler else None, args.exit_duration_in_mins)

    @property
    def active(self) -> bool:
        return self.signal_name is not None or self.duration_s is not None

    def _record(self, signum, frame) -> None:
        self.received = True

    def check(self) -> str | None:
        """Collective (every rank calls it at the same point): why to stop now, or None."""
        if not self.active:
            return None
        over_time = self.duration_s is not None and time.monotonic() - self.start > self.duration_s
        flags = torch.tensor([float(self.received), float(over_time)],
                             device="cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0].item() > 0:
            return f"received {self.signal_name}"
        if flags[1].item() > 0:
            return f"--exit-duration-in-mins {self.duration_s / 60:g} reached"
        return None

    def close(self) -> None:
        if self.signal_name:
            signal.signal(self._signum, self._previous if self._previous is not None else signal.SIG_DFL)
