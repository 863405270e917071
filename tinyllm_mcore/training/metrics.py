"""Throughput, MFU and where a run's scalars go: TensorBoard, a JSONL file (reports, plots), W&B, MLflow, SwanLab.

MFU = achieved model FLOP/s / (peak FLOP/s per device × devices). Model FLOPs per token are
`model.flops_per_token` (matmuls only: 6 × matmul params + 12 × layers × seq × hidden for attention, counted as in
Megatron-LM/PaLM without discounting the causal mask). The peak is a known datasheet figure for common GPUs (dense
bf16), `--peak-tflops` when given, or on CPU a measured matmul peak for the training dtype.

Sinks: every destination is a `MetricsSink` (write a record of scalars under a prefix at an iteration; close, saying
whether the run failed). `MetricsWriter` sends each record to all of them, on the logging rank only (the loop makes
none elsewhere), so every sink gets the same scalars: the training window's means, lr, grad norm, tokens/s, MFU,
skipped steps, MoE metrics, and the validation results. The trackers are optional packages (setup.py's extras
`wandb`, `mlflow`, `swanlab`): `tracker_problem` names the missing one while the flags are validated, before any
model is built, and each is imported only by its sink. Without an API key they write locally: W&B offline (`wandb
sync` later), SwanLab offline (`swanlab sync`); MLflow writes wherever its tracking URI points (a sqlite file, a file
store, or a server).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

# Dense (no sparsity) bf16/fp16 tensor-core peaks, TFLOP/s.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                   "A10": 125.0, "V100": 125.0, "4090": 165.0}


def measured_matmul_tflops(dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 8) -> float:
    """Best-of-N square matmul throughput on this device: the practical peak for MFU on CPUs."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # A private generator: drawing from the global one would shift dropout masks after the first log, and a resumed
    # run (which measures at a different iteration) would no longer repeat the uninterrupted one.
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, dtype=dtype, device=device, generator=generator)
    b = torch.randn(n, n, dtype=dtype, device=device, generator=generator)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def peak_tflops(dtype: torch.dtype, override: float | None = None) -> float:
    if override:
        return override
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in GPU_PEAK_TFLOPS.items():
            if key in name:
                return value if dtype != torch.float32 else value / 2  # TF32 is half the bf16 rate
        return measured_matmul_tflops(dtype if dtype != torch.float32 else torch.float32, n=4096)
    return measured_matmul_tflops(dtype)


class MetricsSink:
    """One destination of the run's scalars."""

    def write(self, iteration: int, scalars: dict, prefix: str) -> None:
        raise NotImplementedError

    def close(self, failed: bool = False) -> None:
        raise NotImplementedError


class TensorBoardSink(MetricsSink):
    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir)

    def write(self, iteration, scalars, prefix):
        for k, v in scalars.items():
            self.writer.add_scalar(f"{prefix}/{k}", v, iteration)

    def close(self, failed=False):
        self.writer.close()


class JsonlSink(MetricsSink):
    """One JSON object per record ({"split": prefix, "iteration": ..., **scalars}), appended and flushed each time."""

    def __init__(self, path: str):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")

    def write(self, iteration, scalars, prefix):
        self.file.write(json.dumps({"split": prefix, "iteration": iteration, **scalars}) + "\n")
        self.file.flush()

    def close(self, failed=False):
        self.file.close()


def _local_unless(key_variable: str, mode_variable: str) -> str | None:
    """A tracker's mode: the library's own choice when its MODE variable is set, online with an API key, else
    offline (files to sync later: a run never waits on, or fails for, a network it was not told to use)."""
    if os.environ.get(mode_variable):
        return None
    return "online" if os.environ.get(key_variable) else "offline"


class WandbSink(MetricsSink):
    def __init__(self, project: str, name: str | None, save_dir: str | None, entity: str | None, config: dict):
        import wandb

        from tinyllm_mcore.runtime import quiet

        quiet.cover_library_handlers()
        if save_dir:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
        # W&B's quiet setting keeps where the run is saved and drops the summary table (--verbose brings it back)
        self.run = wandb.init(project=project, name=name, dir=save_dir, entity=entity, config=config,
                              mode=_local_unless("WANDB_API_KEY", "WANDB_MODE"),
                              settings=wandb.Settings(quiet=not quiet.is_verbose()))

    def write(self, iteration, scalars, prefix):
        self.run.log({f"{prefix}/{k}": v for k, v in scalars.items()}, step=iteration)

    def close(self, failed=False):
        self.run.finish(exit_code=1 if failed else 0)


def is_file_store(tracking_uri: str) -> bool:
    return urlparse(tracking_uri).scheme in ("", "file")


# MLflow's limit on a parameter value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH in 3.x) and on params per batch.
_MLFLOW_PARAM_LENGTH, _MLFLOW_BATCH = 6000, 100


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class MlflowSink(MetricsSink):
    """Through MlflowClient (no process-global active run, so in-process callers can run again)."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str | None, config: dict):
        if is_file_store(tracking_uri):
            # MLflow >= 3.7 refuses file stores unless asked: --mlflow-tracking-uri naming one is that request.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        from tinyllm_mcore.runtime import quiet

        quiet.cover_library_handlers()
        self.client = MlflowClient(tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        params = [Param(k, str(v)[:_MLFLOW_PARAM_LENGTH]) for k, v in _flat(config).items()]
        for i in range(0, len(params), _MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + _MLFLOW_BATCH])

    def write(self, iteration, scalars, prefix):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(f"{prefix}/{k}", float(v), now, iteration)
                                                    for k, v in scalars.items()])

    def close(self, failed=False):
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class SwanlabSink(MetricsSink):
    def __init__(self, project: str, name: str | None, save_dir: str | None, mode: str | None, config: dict):
        import swanlab

        from tinyllm_mcore.runtime import quiet

        quiet.cover_library_handlers()
        self.run = swanlab.init(project=project, name=name, log_dir=save_dir, config=config,
                                mode=mode or _local_unless("SWANLAB_API_KEY", "SWANLAB_MODE"))

    def write(self, iteration, scalars, prefix):
        self.run.log({f"{prefix}/{k}": v for k, v in scalars.items()}, step=iteration)

    def close(self, failed=False):
        if failed:
            self.run.finish(state="crashed", error="the training run ended with an error")
        else:
            self.run.finish()


# tracker -> (the flag that asks for it, the module it needs, the setup.py extra that installs it)
TRACKERS = {"wandb": ("--wandb-project", "wandb", "wandb"), "mlflow": ("--mlflow-tracking-uri", "mlflow", "mlflow"),
            "swanlab": ("--swanlab-project", "swanlab", "swanlab")}
# Database tracking stores: MLflow's SQLAlchemy store (mlflow-skinny leaves these two to the `mlflow` extra).
_MLFLOW_DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # in sys.modules without a spec
        return False


@dataclass(frozen=True)
class Tracking:
    """Where a run's scalars go, from the flags (training/arguments.py's "logging" group)."""
    tensorboard_dir: str | None = None
    metrics_jsonl: str | None = None
    wandb_project: str | None = None
    wandb_exp_name: str | None = None
    wandb_save_dir: str | None = None
    wandb_entity: str | None = None
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str = "tinyllm-mcore"
    mlflow_run_name: str | None = None
    swanlab_project: str | None = None
    swanlab_exp_name: str | None = None
    swanlab_save_dir: str | None = None
    swanlab_mode: str | None = None

    @classmethod
    def from_args(cls, args) -> "Tracking":
        tracking = cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
        # Megatron-LM's default: the trackers' local files beside the checkpoints
        return dataclasses.replace(
            tracking,
            wandb_save_dir=tracking.wandb_save_dir or (os.path.join(args.save, "wandb") if args.save else None),
            swanlab_save_dir=tracking.swanlab_save_dir or (os.path.join(args.save, "swanlog") if args.save else None))

    def requested(self) -> list[str]:
        asked = {"wandb": self.wandb_project, "mlflow": self.mlflow_tracking_uri, "swanlab": self.swanlab_project}
        return [name for name, value in asked.items() if value]

    def problem(self) -> str | None:
        """One line naming a tracker asked for whose package is missing (and its extra), else None."""
        for name in self.requested():
            flag, module, extra = TRACKERS[name]
            if not _installed(module):
                return f"{flag} needs the {module} package, which is not installed: pip install \".[{extra}]\""
        if self.mlflow_tracking_uri and urlparse(self.mlflow_tracking_uri).scheme.split("+")[0] in \
                _MLFLOW_DATABASE_SCHEMES and not (_installed("sqlalchemy") and _installed("alembic")):
            return (f"--mlflow-tracking-uri {self.mlflow_tracking_uri}: a database store needs sqlalchemy and "
                    "alembic, which are not installed: pip install \".[mlflow]\"")
        return None

    def open(self, config: dict) -> "MetricsWriter":
        """The sinks, opened (trackers start their runs with `config`, what a checkpoint records of the run). A
        sink that fails to open closes the ones opened before it."""
        openers = []
        if self.tensorboard_dir:
            openers.append(lambda: TensorBoardSink(self.tensorboard_dir))
        if self.metrics_jsonl:
            openers.append(lambda: JsonlSink(self.metrics_jsonl))
        if self.wandb_project:
            openers.append(lambda: WandbSink(self.wandb_project, self.wandb_exp_name, self.wandb_save_dir,
                                             self.wandb_entity, config))
        if self.mlflow_tracking_uri:
            openers.append(lambda: MlflowSink(self.mlflow_tracking_uri, self.mlflow_experiment, self.mlflow_run_name,
                                              config))
        if self.swanlab_project:
            openers.append(lambda: SwanlabSink(self.swanlab_project, self.swanlab_exp_name, self.swanlab_save_dir,
                                               self.swanlab_mode, config))
        writer = MetricsWriter([])
        try:
            for opener in openers:
                writer.sinks.append(opener())
        except BaseException:
            writer.close(failed=True)
            raise
        return writer


class MetricsWriter:
    """Sends every record to each sink; used on the logging rank."""

    def __init__(self, sinks: list[MetricsSink]):
        self.sinks = sinks

    def write(self, iteration: int, scalars: dict, prefix: str = "train") -> None:
        for sink in self.sinks:
            sink.write(iteration, scalars, prefix)

    def close(self, failed: bool = False) -> None:
        """Close every sink, even when one fails to. Its error is raised after the others are closed; closing a failed
        run only reports it (one line), so the run's own error is the one that ends the command."""
        first_error = None
        for sink in self.sinks:
            try:
                sink.close(failed)
            except Exception as e:  # noqa: BLE001 - the others must still be closed
                if failed:
                    print(f"warning: closing {type(sink).__name__}: {e}", file=sys.stderr, flush=True)
                first_error = first_error or e
        self.sinks = []
        if first_error is not None and not failed:
            raise first_error
