"""A pretrain --load resolves the path once, parses the latest pointer once and reads the checkpoint's common state
once (issue 26): counted around the functions that do each, in a real in-process run of the pretrain CLI."""
import json
import sys
from collections import Counter
from pathlib import Path

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import serialization

from tinyllm_mcore.checkpoint import io as ckpt
from tinyllm_mcore.checkpoint import safety
from tinyllm_mcore.stages import pretrain

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint_v0"


def test_pretrain_load_resolves_and_reads_once(monkeypatch, tmp_path):
    calls = Counter()

    def counted(name, function, ours_only=False):
        def wrapper(*args, **kwargs):
            # megatron-core 0.19's own tensor load reads the common state inside dist_checkpointing.load; only
            # reads asked for by this project's code count
            if not ours_only or "/tinyllm_mcore/" in sys._getframe(1).f_code.co_filename:
                calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(ckpt, "resolve_load_dir", counted("resolve", ckpt.resolve_load_dir))
    monkeypatch.setattr(safety, "read_tracker", counted("tracker", safety.read_tracker))
    # the common state, asked for by any of our modules
    common_reader = counted("common state", serialization.load_common_state_dict, ours_only=True)
    monkeypatch.setattr(serialization, "load_common_state_dict", common_reader)
    monkeypatch.setattr(dist_checkpointing, "load_common_state_dict", common_reader)

    flags = json.loads((FIXTURE / "expected.json").read_text())["model_flags"]
    flags[flags.index("--tokenizer-model") + 1] = str(FIXTURE / "tokenizer")
    assert pretrain.main([*flags, "--load", str(FIXTURE / "ckpt"), "--metrics-jsonl", str(tmp_path / "m.jsonl")]) == 0
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 2  # it resumed and trained iterations 3 and 4
    assert calls == {"resolve": 1, "tracker": 1, "common state": 1}
