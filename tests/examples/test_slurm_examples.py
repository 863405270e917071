"""The Slurm examples, run in DRY_RUN mode under fake `srun`/`scontrol`/`sbatch`: the generated command lines are
parsed with the real CLI parsers (a wrong flag fails here), the parallel layout is checked with the runtime's own
check, and the stages chain (pretrain save = SFT load, SFT save = DPO load, DPO save = convert load)."""
from __future__ import annotations

import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
SCRIPTS = ("preprocess_corpus", "pretrain_92m_multinode", "sft_92m", "dpo_92m", "convert_to_hf")

FAKE_SRUN = """#!/bin/bash
# records its argv (one per line) and succeeds without running anything
printf '%s\\n' "$@" > "$FAKE_SLURM_LOG/srun.$$.args"
"""
FAKE_SCONTROL = """#!/bin/bash
[ "$1 $2" = "show hostnames" ] || { echo "fake scontrol: unexpected $*" >&2; exit 1; }
echo node01; echo node02
"""
# sbatch runs a spool copy of the script (as Slurm does) with the job's environment.
FAKE_SBATCH = """#!/bin/bash
spool="$FAKE_SLURM_LOG/spool"; mkdir -p "$spool"; cp "$1" "$spool/slurm_script"
SLURM_SUBMIT_DIR="$PWD" SLURM_JOB_ID=777 exec bash "$spool/slurm_script"
"""


@pytest.fixture()
def slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("sbatch", FAKE_SBATCH)):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "log"
    log.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", FAKE_SLURM_LOG=str(log), WORK_DIR=str(tmp_path / "work"),
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[01-02]", SLURM_JOB_NUM_NODES="2", DRY_RUN="1")
    env.pop("REPO", None)
    return env, log


def sbatch_header(name: str) -> dict[str, str]:
    header = {}
    for line in (EXAMPLES / f"{name}.sh").read_text().splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            header[key] = value
    return header


def run_script(name: str, env: dict, **overrides) -> list[list[str]]:
    """The script's output lines, split like the shell; the job allocation is the script's own #SBATCH --nodes."""
    env = {**env, "SLURM_JOB_NUM_NODES": sbatch_header(name)["nodes"], **{k: str(v) for k, v in overrides.items()}}
    proc = subprocess.run(["bash", str(EXAMPLES / f"{name}.sh")], env=env, capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


def split_launch(argv: list[str]) -> tuple[list[str], list[str], str, list[str]]:
    """srun args, launcher (python [-m torch.distributed.run ...]) args, module, module args."""
    assert argv[0] == "srun", argv
    python_at = next(i for i, a in enumerate(argv) if not a.startswith("-") and i > 0)
    srun, rest = argv[1:python_at], argv[python_at:]
    module_at = max(i for i, a in enumerate(rest) if a == "-m") + 1
    return srun, rest[:module_at - 1], rest[module_at], rest[module_at + 1:]


def flag(args: list[str], name: str) -> str:
    return next(a.split("=", 1)[1] for a in args if a.startswith(name + "="))


def parse_stage(module: str, argv: list[str]):
    """The real stage parser (build_parser + the stage's extra_args + validate)."""
    import importlib

    from tinyllm_mcore.training.loop import parse_args

    return parse_args(importlib.import_module(module).STAGE, argv)


def check_training_launch(argv: list[str], module: str, nodes: int = 2):
    from tinyllm_mcore.presets import get_preset
    from tinyllm_mcore.runtime.distributed import check_parallel_layout

    srun, launcher, got_module, stage_argv = split_launch(argv)
    assert got_module == module
    assert f"--nodes={nodes}" in srun and "--ntasks-per-node=1" in srun
    assert launcher[1:3] == ["-m", "torch.distributed.run"]
    assert flag(launcher, "--nnodes") == str(nodes)
    assert flag(launcher, "--rdzv-endpoint") == "node01:29500"  # first host from scontrol show hostnames
    world = nodes * int(flag(launcher, "--nproc-per-node"))
    args = parse_stage(module, stage_argv)
    preset = get_preset(args.model_size)
    dp = check_parallel_layout(world, args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                               preset.num_attention_heads, preset.num_layers, None, 1, preset.kv_heads,
                               preset.num_experts)
    assert args.global_batch_size % (args.micro_batch_size * dp) == 0
    return args, world, srun


def test_full_chain_parses_with_real_parsers_and_paths_connect(slurm):
    from checkpoint_convert.mcore_to_hf import build_parser as convert_parser
    from tinyllm_mcore.data.preprocess import output_prefixes
    from tools.preprocess_data import parse_args as preprocess_parser
    from tools.train_tokenizer import parse_args as tokenizer_parser

    env, _ = slurm
    work = Path(env["WORK_DIR"])
    prep = run_script("preprocess_corpus", env)
    tokenizer_cmd, *preprocess_cmds = prep
    srun, launcher, module, argv = split_launch(tokenizer_cmd)
    assert module == "tools.train_tokenizer" and "--ntasks=1" in srun
    tokenizer_dir = tokenizer_parser(argv).output_dir
    outputs = {}
    for cmd in preprocess_cmds:
        _, _, module, argv = split_launch(cmd)
        assert module == "tools.preprocess_data"
        a = preprocess_parser(argv)
        assert a.tokenizer_model == tokenizer_dir
        outputs[a.mode] = outputs.get(a.mode, []) + output_prefixes(a.output_prefix, a.mode, a.json_keys)
    assert len(outputs["pretrain"]) == 3 and len(outputs["sft"]) == len(outputs["preference"]) == 1

    pretrain, world, _ = check_training_launch(run_script("pretrain_92m_multinode", env)[0], "tinyllm_mcore.pretrain")
    assert world == 16 and pretrain.model_size == "92m" and pretrain.load is None  # fresh run
    from tinyllm_mcore.data.pretrain import parse_blend

    prefixes, weights = parse_blend(pretrain.data_path)
    assert prefixes == outputs["pretrain"] and weights and abs(sum(weights) - 1) < 1e-9
    assert pretrain.tokenizer_model == tokenizer_dir
    assert pretrain.tensorboard_dir and pretrain.metrics_jsonl and pretrain.save_interval

    sft, _, _ = check_training_launch(run_script("sft_92m", env)[0], "tinyllm_mcore.sft", nodes=1)
    assert sft.load == pretrain.save and sft.finetune
    assert sft.sft_data == outputs["sft"] and sft.tokenizer_model == tokenizer_dir
    dpo, _, _ = check_training_launch(run_script("dpo_92m", env)[0], "tinyllm_mcore.dpo", nodes=1)
    assert dpo.load == sft.save and dpo.finetune and dpo.ref_load == sft.save
    assert dpo.preference_data == outputs["preference"]
    assert len({pretrain.save, sft.save, dpo.save}) == 3
    assert all(Path(p).is_relative_to(work) for p in (pretrain.save, sft.save, dpo.save, tokenizer_dir))

    (cmd,) = run_script("convert_to_hf", env)
    _, _, module, argv = split_launch(cmd)
    convert = convert_parser().parse_args(argv)
    assert module == "checkpoint_convert.mcore_to_hf" and convert.load == dpo.save
    assert convert.tokenizer_model == tokenizer_dir


@pytest.mark.parametrize("tp,pp,nodes,gpus", [(2, 1, 2, 8), (2, 2, 2, 8), (8, 1, 1, 8), (1, 4, 4, 8)])
def test_layout_overrides(slurm, tp, pp, nodes, gpus):
    env, _ = slurm
    (cmd,) = run_script("pretrain_92m_multinode", env, TP=tp, PP=pp, NNODES=nodes, GPUS_PER_NODE=gpus,
                        GLOBAL_BATCH=512, MICRO_BATCH=8)
    args, world, _ = check_training_launch(cmd, "tinyllm_mcore.pretrain", nodes=nodes)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, world) == (tp, pp, nodes * gpus)
    assert args.global_batch_size == 512 and args.micro_batch_size == 8


@pytest.mark.parametrize("overrides,message", [
    (dict(TP=3), "does not divide the world size 16"),
    (dict(TP=2, PP=2, NNODES=1, GPUS_PER_NODE=2), "does not divide the world size 2"),
    (dict(GLOBAL_BATCH=100), "is not a multiple of MICRO_BATCH=32 x DP=16"),
])
def test_bad_layouts_fail_with_one_line(slurm, overrides, message):
    env, _ = slurm
    proc = subprocess.run(["bash", str(EXAMPLES / "pretrain_92m_multinode.sh")], capture_output=True, text=True,
                          env={**env, **{k: str(v) for k, v in overrides.items()}}, cwd=REPO, timeout=60)
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.strip().startswith("error:") and message in proc.stderr


def test_container_and_resume(slurm):
    env, _ = slurm
    work = Path(env["WORK_DIR"])
    (cmd,) = run_script("pretrain_92m_multinode", env, CONTAINER_IMAGE="nvcr.io/nvidia/pytorch:25.01-py3")
    srun, *_ = split_launch(cmd)
    assert "--container-image=nvcr.io/nvidia/pytorch:25.01-py3" in srun
    assert flag(srun, "--container-workdir") == str(REPO)
    assert f"{REPO}:{REPO}" in flag(srun, "--container-mounts")

    # a save with a checkpoint in it: each stage resumes from its own save (and DPO keeps the SFT reference)
    for stage in ("pretrain", "sft", "dpo"):
        (work / "checkpoints" / stage).mkdir(parents=True)
        (work / "checkpoints" / stage / "latest_checkpointed_iteration.txt").write_text("100")
    pretrain, _, _ = check_training_launch(run_script("pretrain_92m_multinode", env)[0], "tinyllm_mcore.pretrain")
    sft, _, _ = check_training_launch(run_script("sft_92m", env)[0], "tinyllm_mcore.sft", nodes=1)
    dpo, _, _ = check_training_launch(run_script("dpo_92m", env)[0], "tinyllm_mcore.dpo", nodes=1)
    assert pretrain.load == pretrain.save and sft.load == sft.save and dpo.load == dpo.save
    assert not sft.finetune and not dpo.finetune and dpo.ref_load == sft.save


def test_sbatch_headers_and_real_launch_through_sbatch(slurm):
    env, log = slurm
    for name in SCRIPTS:
        header = sbatch_header(name)
        assert {"job-name", "nodes", "time"} <= set(header), name
        if name in ("pretrain_92m_multinode", "sft_92m", "dpo_92m"):
            assert header["gpus-per-node"] == "8" and header["ntasks-per-node"] == "1"
    assert (EXAMPLES / "pretrain_92m_multinode.sh").read_text().count("#SBATCH --nodes=2") == 1

    # sbatch runs a spool copy (the repository is found from SLURM_SUBMIT_DIR); without DRY_RUN srun really runs
    dry = run_script("pretrain_92m_multinode", env)[0]
    real_env = {k: v for k, v in env.items() if k not in ("DRY_RUN", "SLURM_JOB_ID")}
    real_env["SLURM_JOB_NUM_NODES"] = "2"
    proc = subprocess.run(["sbatch", str(EXAMPLES / "pretrain_92m_multinode.sh")], env=real_env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (recorded,) = list(log.glob("srun.*.args"))
    launched = ["srun"] + recorded.read_text().splitlines()
    assert launched == [a.replace("4242", "777") for a in dry]  # same command, the job id aside


def test_quickstart_wrapper_and_outside_slurm(tmp_path):
    proc = subprocess.run(["bash", str(EXAMPLES / "quickstart.sh"), "--help"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)
    assert proc.returncode == 0 and "--fast" in proc.stdout
    # outside a Slurm job the examples run the command directly (no srun)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(EXAMPLES / "convert_to_hf.sh")], capture_output=True, text=True, cwd=tmp_path,
                          env={**env, "DRY_RUN": "1", "WORK_DIR": str(tmp_path)}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout)[:3] == ["python", "-m", "checkpoint_convert.mcore_to_hf"]
