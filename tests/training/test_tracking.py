"""Experiment tracking (--wandb-*, --mlflow-*, --swanlab-*): real runs, then what each tracker stored, read offline.

W&B and SwanLab write their runs as LevelDB-style record logs of protobuf messages (`*.wandb`, `*.swanlab`); the
records are read here with `read_record_log` and decoded with each package's own message types. MLflow is read with
its client API. Every tracker must hold exactly the scalars of the run's JSONL file.
"""
import json
import math
import os
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def trackers():
    """The runs below need W&B and MLflow (the `dev` extra installs them); SwanLab joins them where installed (its
    protobuf < 7 pin conflicts with sentencepiece 0.2.3, so `dev` leaves it out: setup.py)."""
    for module in ("wandb", "mlflow"):
        pytest.importorskip(module)


def swanlab_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("swanlab") is not None

# Local files only: no key, no mode a developer's shell may have set.
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "SWANLAB_", "MLFLOW_"))}
ENV.update(OMP_NUM_THREADS="1", TINYLLM_VERBOSE="0")

BLOCK, HEADER = 32768, 7
LOG_FULL, LOG_FIRST, LOG_MIDDLE, LOG_LAST = 1, 2, 3, 4


def read_record_log(path: Path, ident: bytes, magic: int, version: int) -> list[bytes]:
    """The records of a LevelDB log file (leveldb's doc/log_format.md) as W&B and SwanLab write it: a 7-byte file
    header (ident, magic, version), then 32 KiB blocks of records, each with a CRC-32 of its type and data."""
    data = path.read_bytes()
    assert struct.unpack_from("<4sHB", data) == (ident, magic, version), f"{path}: not a {ident} log"
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        checksum, length, kind = struct.unpack_from("<IHB", data, pos)
        if (checksum, length, kind) == (0, 0, 0):  # zero-filled rest of a block
            pos += BLOCK - pos % BLOCK
            continue
        chunk = data[pos + HEADER:pos + HEADER + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == checksum, f"{path}: bad checksum at {pos}"
        pos += HEADER + length
        pending += chunk
        if kind in (LOG_FULL, LOG_LAST):
            records.append(pending)
            pending = b""
    return records


def jsonl_scalars(path: Path) -> dict[int, dict[str, float]]:
    """{iteration: {"train/lm loss": ..., "valid/lm loss": ...}} from the run's --metrics-jsonl."""
    out: dict[int, dict[str, float]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        split, iteration = record.pop("split"), record.pop("iteration")
        out.setdefault(iteration, {}).update({f"{split}/{k}": v for k, v in record.items()})
    return out


def wandb_run(save_dir: Path):
    """The one offline run under save_dir: (scalars by step, config, exit code)."""
    from wandb.proto import wandb_internal_pb2

    runs = list(save_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    scalars, config, exit_code = {}, {}, None
    for raw in read_record_log(runs[0], b":W&B", 0xBEE1, 0):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            scalars[record.history.step.num] = {k: v for k, v in row.items() if not k.startswith("_")}
        elif kind == "run":
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "exit":
            exit_code = record.exit.exit_code
    return scalars, config, exit_code


def swanlab_run(save_dir: Path):
    """The one offline run under save_dir: (scalars by step, finish state name)."""
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.proto.swanlab.run.v1.run_pb2 import RunState

    runs = list(save_dir.glob("run-*/run-*.swanlab"))
    assert len(runs) == 1, runs
    scalars, state = {}, None
    for raw in read_record_log(runs[0], b":SWL", 0xE1D6, 2):
        record = Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "scalar":
            scalars.setdefault(record.scalar.step, {})[record.scalar.key] = record.scalar.value.number
        elif kind == "finish":
            state = RunState.Name(record.finish.state)
    return scalars, state


def mlflow_run(tracking_uri: str, experiment: str = "tinyllm-mcore"):
    """The experiment's one run: (scalars by step, params, status)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, runs
    run = runs[0]
    scalars: dict[int, dict[str, float]] = {}
    for key in run.data.metrics:
        for m in client.get_metric_history(run.info.run_id, key):
            scalars.setdefault(m.step, {})[key] = m.value
    return scalars, run.data.params, run.info.status


def assert_same_scalars(stored: dict, expected: dict, tracker: str) -> None:
    assert sorted(stored) == sorted(expected), (tracker, sorted(stored), sorted(expected))
    for step, row in expected.items():
        assert sorted(stored[step]) == sorted(row), (tracker, step, stored[step], row)
        for key, value in row.items():  # exactly: every tracker keeps float64
            got = stored[step][key]
            assert got == value or (math.isnan(got) and math.isnan(value)), (tracker, step, key, got, value)


def tracker_flags(tmp: Path, mlflow_uri: str) -> list[str]:
    return ["--metrics-jsonl", str(tmp / "metrics.jsonl"),
            "--wandb-project", "tiny", "--wandb-exp-name", "dp2", "--wandb-save-dir", str(tmp / "wandb"),
            "--mlflow-tracking-uri", mlflow_uri, "--mlflow-run-name", "dp2",
            *(["--swanlab-project", "tiny", "--swanlab-exp-name", "dp2", "--swanlab-save-dir", str(tmp / "swanlab")]
              if swanlab_installed() else [])]


@pytest.mark.slow
@pytest.mark.distributed
def test_every_tracker_stores_the_jsonl_scalars_from_the_logging_rank_only(tmp_path, trackers):
    """A DP2 pretrain with all three trackers (W&B and SwanLab offline, MLflow in sqlite) and evaluation: each holds
    one run (written by one rank) whose scalars equal the JSONL's, and the run's config; all closed as finished."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={port}",
           "-m", "tinyllm_mcore.stages.pretrain", "--model-size", "tiny", "--mock-data", "--seq-length", "32",
           "--micro-batch-size", "2", "--train-iters", "4", "--log-interval", "2", "--eval-interval", "2",
           "--eval-iters", "1", *tracker_flags(tmp_path, uri)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    expected = jsonl_scalars(tmp_path / "metrics.jsonl")
    assert sorted(expected) == [2, 4] and "valid/lm loss" in expected[4] and "train/mfu" in expected[2]

    scalars, config, exit_code = wandb_run(tmp_path / "wandb")
    assert_same_scalars(scalars, expected, "wandb")
    assert exit_code == 0 and config["stage"] == "pretrain" and config["data_parallel_size"] == 2

    scalars, params, status = mlflow_run(uri)
    assert_same_scalars(scalars, expected, "mlflow")
    assert status == "FINISHED" and params["stage"] == "pretrain" and params["preset.name"] == "tiny"

    if swanlab_installed():
        scalars, state = swanlab_run(tmp_path / "swanlab")
        assert_same_scalars(scalars, expected, "swanlab")
        assert state == "RUN_STATE_FINISHED"
    # nothing in the working folder: no rank fell back to a tracker's default place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "mlflow.db", *(["swanlab"] if
                                                          swanlab_installed() else []), "wandb"]


def test_a_failed_run_is_closed_as_failed_with_what_it_logged(tmp_path, monkeypatch, trackers):
    """In process: a run that aborts (non-finite losses past --max-skipped-iters) after two logged iterations; each
    tracker (MLflow as a file store here) is closed, marked failed, with the scalars logged until then."""
    from tests.harness.progression_data import progression_datasets
    from tinyllm_mcore.runtime import distributed as rt
    from tinyllm_mcore.training.batches import lm_forward_step
    from tinyllm_mcore.training.loop import Stage, parse_args, train

    for name in [k for k in os.environ if k.startswith(("WANDB_", "SWANLAB_", "MLFLOW_"))]:
        monkeypatch.delenv(name)
    calls = {"n": 0}

    def forward_step(ctx, data_iterator, model):  # iterations 3 and on: a NaN loss
        output, loss_fn = lm_forward_step(ctx, data_iterator, model)
        calls["n"] += 1
        poison = calls["n"] >= 3

        def loss(output_tensor):
            total, count, report = loss_fn(output_tensor)
            if poison:
                total, report = total * float("nan"), {k: v * float("nan") for k, v in report.items()}
            return total, count, report

        return output, loss

    stage = Stage("pretrain", progression_datasets, forward_step)
    uri = (tmp_path / "mlruns").as_uri()
    args = parse_args(stage, ["--model-size", "tiny", "--seq-length", "32", "--micro-batch-size", "2",
                              "--mock-data", "--train-iters", "6", "--log-interval", "1", "--max-skipped-iters", "2",
                              *tracker_flags(tmp_path, uri)])
    with pytest.raises(FloatingPointError, match="2 iterations had a non-finite loss"):
        try:
            train(stage, args)
        finally:
            rt.destroy()
    expected = jsonl_scalars(tmp_path / "metrics.jsonl")
    assert sorted(expected) == [1, 2, 3]  # iteration 4 aborts before it is logged
    scalars, _, exit_code = wandb_run(tmp_path / "wandb")
    assert_same_scalars(scalars, expected, "wandb")
    assert exit_code == 1
    scalars, _, status = mlflow_run(uri)
    assert_same_scalars(scalars, expected, "mlflow")
    assert status == "FAILED"
    if swanlab_installed():
        scalars, state = swanlab_run(tmp_path / "swanlab")
        assert_same_scalars(scalars, expected, "swanlab")
        assert state == "RUN_STATE_CRASHED"


MISSING = """
import sys
from tinyllm_mcore.stages.pretrain import main
base = ["--model-size", "tiny", "--mock-data", "--train-iters", "1", "--save", sys.argv[1] + "/never"]
sqlite = ["--mlflow-tracking-uri", "sqlite:///x.db"]
for hidden, flags in [("wandb", ["--wandb-project", "p"]), ("mlflow", sqlite), ("swanlab", ["--swanlab-project", "p"]),
                      ("sqlalchemy", sqlite)]:
    sys.modules[hidden] = None  # as if not installed
    print(main(base + flags), flush=True)
    del sys.modules[hidden]
"""


def test_a_missing_tracker_package_is_one_error_line_naming_the_extra(tmp_path):
    proc = subprocess.run([sys.executable, "-c", MISSING, str(tmp_path)], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2", "2", "2", "2"]
    assert proc.stderr.splitlines() == [
        'error: --wandb-project needs the wandb package, which is not installed: pip install ".[wandb]"',
        'error: --mlflow-tracking-uri needs the mlflow package, which is not installed: pip install ".[mlflow]"',
        'error: --swanlab-project needs the swanlab package, which is not installed: pip install ".[swanlab]"',
        "error: --mlflow-tracking-uri sqlite:///x.db: a database store needs sqlalchemy and alembic, which are not "
        'installed: pip install ".[mlflow]"']
    assert not (tmp_path / "never").exists()  # refused while the flags were read: no run started
