"""The Slurm examples' command lines, cheaply: DRY_RUN mode under fake `srun`/`scontrol`/`sbatch` (no cluster). The
generated command lines are parsed with the real CLI parsers (a wrong flag fails here), the parallel layout is checked
with the runtime's own check, and the stages chain (pretrain save = SFT load, SFT save = DPO load, DPO save = convert
load). The jobs themselves run for real on a local Slurm cluster in test_slurm_jobs.py."""
from __future__ import annotations

import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
SCRIPTS = ("preprocess_corpus", "pretrain_92m_multinode", "sft_92m", "dpo_92m", "grpo_92m", "convert_to_hf")

FAKE_SRUN = """#!/bin/bash
# records its argv (one per line) and succeeds without running anything
printf '%s\\n' "$@" > "$FAKE_SLURM_LOG/srun.$$.args"
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1 $2 ${3:-}" in
  "show hostnames node[01-02]") echo node01; echo node02 ;;
  "show node node01") echo "NodeName=node01 Arch=x86_64"; echo "   NodeAddr=10.0.0.1 NodeHostName=node01" ;;
  *) echo "fake scontrol: unexpected $*" >&2; exit 1 ;;
esac
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


def split_launch(argv: list[str]) -> tuple[dict[str, str], list[str], str, list[str]]:
    """[env K=V ...] srun ARGS python -m MODULE ARGS -> (env, srun args, module, module args)."""
    env = {}
    if argv[0] == "env":
        argv = argv[1:]
        while "=" in argv[0]:
            key, _, value = argv.pop(0).partition("=")
            env[key] = value
    assert argv[0] == "srun", argv
    python_at = next(i for i, a in enumerate(argv) if not a.startswith("-") and i > 0)
    srun, rest = argv[1:python_at], argv[python_at:]
    assert rest[1] == "-m", rest  # python -m MODULE: one process per srun task, no launcher in between
    return env, srun, rest[2], rest[3:]


def flag(args: list[str], name: str) -> str:
    return next(a.split("=", 1)[1] for a in args if a.startswith(name + "="))


def parse_stage(module: str, argv: list[str]):
    """The real stage parser (build_parser + the stage's extra_args + validate)."""
    import importlib

    from tinyllm_mcore.training.loop import parse_args

    return parse_args(importlib.import_module(module).STAGE, argv)


def check_training_launch(argv: list[str], module: str, nodes: int = 2):
    from tinyllm_mcore.model.presets import get_preset
    from tinyllm_mcore.runtime.distributed import check_parallel_layout

    env, srun, got_module, stage_argv = split_launch(argv)
    assert got_module == module
    assert flag(srun, "--nodes") == str(nodes) and "--kill-on-bad-exit=1" in srun
    # the first node's NodeAddr (scontrol show node), a port derived from the job id 4242
    assert env == {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "24242"}
    world = nodes * int(flag(srun, "--ntasks-per-node"))
    args = parse_stage(module, stage_argv)
    assert args.exit_signal_handler and args.exit_signal == "SIGTERM"  # what #SBATCH --signal=TERM@120 sends
    preset = get_preset(args.model_size)
    dp = check_parallel_layout(world, args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                               preset.num_attention_heads, preset.num_layers, None, 1, preset.kv_heads,
                               preset.num_experts)
    assert args.global_batch_size % (args.micro_batch_size * dp) == 0
    return args, world, srun


def test_full_chain_parses_with_real_parsers_and_paths_connect(slurm):
    from tinyllm_mcore.cli.mcore_to_hf import build_parser as convert_parser
    from tinyllm_mcore.data.preprocess import output_prefixes
    from tinyllm_mcore.cli.preprocess_data import parse_args as preprocess_parser
    from tinyllm_mcore.cli.train_tokenizer import parse_args as tokenizer_parser

    env, _ = slurm
    work = Path(env["WORK_DIR"])
    prep = run_script("preprocess_corpus", env)
    tokenizer_cmd, *preprocess_cmds = prep
    _, srun, module, argv = split_launch(tokenizer_cmd)
    assert module == "tinyllm_mcore.cli.train_tokenizer" and "--ntasks=1" in srun
    tokenizer_dir = tokenizer_parser(argv).output_dir
    outputs = {}
    for cmd in preprocess_cmds:
        _, _, module, argv = split_launch(cmd)
        assert module == "tinyllm_mcore.cli.preprocess_data"
        a = preprocess_parser(argv)
        assert a.tokenizer_model == tokenizer_dir
        outputs[a.mode] = outputs.get(a.mode, []) + output_prefixes(a.output_prefix, a.mode, a.json_keys)
    assert len(outputs["pretrain"]) == 3 and len(outputs["sft"]) == len(outputs["preference"]) == 1

    pretrain, world, _ = check_training_launch(run_script("pretrain_92m_multinode", env)[0], "tinyllm_mcore.stages.pretrain")
    assert world == 16 and pretrain.model_size == "92m" and pretrain.load is None  # fresh run
    from tinyllm_mcore.data.prefixes import parse_blend

    prefixes, weights = parse_blend(pretrain.data_path)
    assert prefixes == outputs["pretrain"] and weights and abs(sum(weights) - 1) < 1e-9
    assert pretrain.tokenizer_model == tokenizer_dir
    assert pretrain.tensorboard_dir and pretrain.metrics_jsonl and pretrain.save_interval

    sft, _, _ = check_training_launch(run_script("sft_92m", env)[0], "tinyllm_mcore.stages.sft", nodes=1)
    assert sft.load == pretrain.save and sft.finetune
    assert sft.sft_data == outputs["sft"] and sft.tokenizer_model == tokenizer_dir
    dpo, _, _ = check_training_launch(run_script("dpo_92m", env)[0], "tinyllm_mcore.stages.dpo", nodes=1)
    assert dpo.load == sft.save and dpo.finetune and dpo.ref_load == sft.save
    assert dpo.preference_data == outputs["preference"]
    grpo, _, _ = check_training_launch(run_script("grpo_92m", env)[0], "tinyllm_mcore.stages.grpo", nodes=1)
    assert grpo.load == sft.save and grpo.finetune and grpo.ref_load == sft.save and grpo.kl_beta > 0
    assert grpo.task == "chain_sum" and grpo.prompts is None and grpo.global_batch_size % grpo.group_size == 0
    assert grpo.tokenizer_model == tokenizer_dir
    assert len({pretrain.save, sft.save, dpo.save, grpo.save}) == 4
    assert all(Path(p).is_relative_to(work) for p in (pretrain.save, sft.save, dpo.save, grpo.save, tokenizer_dir))

    (cmd,) = run_script("convert_to_hf", env)
    _, _, module, argv = split_launch(cmd)
    convert = convert_parser().parse_args(argv)
    assert module == "tinyllm_mcore.cli.mcore_to_hf" and convert.load == dpo.save
    assert convert.tokenizer_model == tokenizer_dir


@pytest.mark.parametrize("tp,pp,nodes,gpus", [(2, 1, 2, 8), (2, 2, 2, 8), (8, 1, 1, 8), (1, 4, 4, 8)])
def test_layout_overrides(slurm, tp, pp, nodes, gpus):
    env, _ = slurm
    (cmd,) = run_script("pretrain_92m_multinode", env, TP=tp, PP=pp, NNODES=nodes, GPUS_PER_NODE=gpus,
                        GLOBAL_BATCH=512, MICRO_BATCH=8)
    args, world, _ = check_training_launch(cmd, "tinyllm_mcore.stages.pretrain", nodes=nodes)
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
    _, srun, *_ = split_launch(cmd)
    assert "--container-image=nvcr.io/nvidia/pytorch:25.01-py3" in srun
    assert flag(srun, "--container-workdir") == str(REPO)
    assert f"{REPO}:{REPO}" in flag(srun, "--container-mounts")

    # a save with a checkpoint in it: each stage resumes from its own save (and DPO keeps the SFT reference)
    for stage in ("pretrain", "sft", "dpo"):
        (work / "checkpoints" / stage).mkdir(parents=True)
        (work / "checkpoints" / stage / "latest_checkpointed_iteration.txt").write_text("100")
    pretrain, _, _ = check_training_launch(run_script("pretrain_92m_multinode", env)[0], "tinyllm_mcore.stages.pretrain")
    sft, _, _ = check_training_launch(run_script("sft_92m", env)[0], "tinyllm_mcore.stages.sft", nodes=1)
    dpo, _, _ = check_training_launch(run_script("dpo_92m", env)[0], "tinyllm_mcore.stages.dpo", nodes=1)
    assert pretrain.load == pretrain.save and sft.load == sft.save and dpo.load == dpo.save
    assert not sft.finetune and not dpo.finetune and dpo.ref_load == sft.save


def test_sbatch_headers_and_spool_copy(slurm):
    env, log = slurm
    for name in SCRIPTS:
        header = sbatch_header(name)
        assert {"job-name", "nodes", "time"} <= set(header), name
        if name in ("pretrain_92m_multinode", "sft_92m", "dpo_92m", "grpo_92m"):
            # one task per GPU; SIGTERM 2 minutes before the limit; requeue-safe, one log across restarts
            assert header["gpus-per-node"] == header["ntasks-per-node"] == "8"
            assert header["signal"] == "TERM@120" and "requeue" in header and header["open-mode"] == "append"
    assert (EXAMPLES / "pretrain_92m_multinode.sh").read_text().count("#SBATCH --nodes=2") == 1

    # sbatch runs a spool copy (the repository is found from SLURM_SUBMIT_DIR); without DRY_RUN the (fake) srun runs
    dry = run_script("pretrain_92m_multinode", env)[0]
    real_env = {k: v for k, v in env.items() if k not in ("DRY_RUN", "SLURM_JOB_ID")}
    real_env["SLURM_JOB_NUM_NODES"] = "2"
    proc = subprocess.run(["sbatch", str(EXAMPLES / "pretrain_92m_multinode.sh")], env=real_env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (recorded,) = list(log.glob("srun.*.args"))
    launched = ["srun"] + recorded.read_text().splitlines()
    assert launched == dry[dry.index("srun"):]  # the same command


def test_quickstart_wrapper_and_outside_slurm(tmp_path):
    proc = subprocess.run(["bash", str(EXAMPLES / "quickstart.sh"), "--help"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)
    assert proc.returncode == 0 and "--fast" in proc.stdout
    # outside a Slurm job the examples run the command directly (no srun)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(EXAMPLES / "convert_to_hf.sh")], capture_output=True, text=True, cwd=tmp_path,
                          env={**env, "DRY_RUN": "1", "WORK_DIR": str(tmp_path)}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout)[:3] == ["python", "-m", "tinyllm_mcore.cli.mcore_to_hf"]


def test_model_size_extra_args_and_cpu_shape(slurm):
    env, _ = slurm
    # a CPU job: sbatch --ntasks-per-node=1 sets SLURM_NTASKS_PER_NODE, which is the processes per node by default
    for name, module, nodes in (("pretrain_92m_multinode", "tinyllm_mcore.stages.pretrain", 2),
                                ("sft_92m", "tinyllm_mcore.stages.sft", 1), ("dpo_92m", "tinyllm_mcore.stages.dpo", 1),
                                ("grpo_92m", "tinyllm_mcore.stages.grpo", 1)):
        (cmd,) = run_script(name, env, MODEL_SIZE="tiny", SLURM_NTASKS_PER_NODE=1, MICRO_BATCH=1, GLOBAL_BATCH=8,
                            EXTRA_ARGS="--lr 0.002 --seed 7")
        args, world, srun = check_training_launch(cmd, module, nodes=nodes)
        assert world == nodes and flag(srun, "--ntasks-per-node") == "1"
        assert (args.model_size, args.lr, args.seed) == ("tiny", 0.002, 7)  # EXTRA_ARGS comes last: it overrides
    (cmd,) = run_script("convert_to_hf", env, EXTRA_ARGS="--dtype fp32")
    assert cmd[-2:] == ["--dtype", "fp32"]


def test_hf_flags_through_extra_args(slurm):
    """--save-hf passes through; --load-hf DIR replaces the stage's fallback start (SFT's and DPO's --load X
    --finetune) and gives way to a resume from the stage's own save."""
    env, _ = slurm
    work = Path(env["WORK_DIR"])
    stages = (("pretrain_92m_multinode", "tinyllm_mcore.stages.pretrain", 2, "pretrain"),
              ("sft_92m", "tinyllm_mcore.stages.sft", 1, "sft"), ("dpo_92m", "tinyllm_mcore.stages.dpo", 1, "dpo"))
    for extra in ("--save-hf --load-hf /models/hf --seed 7", "--save-hf --load-hf=/models/hf --seed 7"):
        for name, module, nodes, _ in stages:
            args, _, _ = check_training_launch(run_script(name, env, EXTRA_ARGS=extra)[0], module, nodes=nodes)
            assert (args.load_hf, args.load, args.finetune, args.save_hf, args.seed) == (
                "/models/hf", None, False, True, 7), name
    for name, module, nodes, stage in stages:
        (work / "checkpoints" / stage).mkdir(parents=True)
        (work / "checkpoints" / stage / "latest_checkpointed_iteration.txt").write_text("100")
        args, _, _ = check_training_launch(run_script(name, env, EXTRA_ARGS="--load-hf /models/hf --save-hf")[0],
                                           module, nodes=nodes)
        assert (args.load, args.load_hf, args.save_hf) == (args.save, None, True), name


def test_outside_slurm_the_training_scripts_run_torchrun(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(EXAMPLES / "sft_92m.sh")], capture_output=True, text=True, cwd=tmp_path,
                          env={**env, "DRY_RUN": "1", "WORK_DIR": str(tmp_path), "GPUS_PER_NODE": "2",
                               "GLOBAL_BATCH": "32"}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout)
    assert argv[:3] == ["python", "-m", "torch.distributed.run"]
    assert "--nproc-per-node=2" in argv and "--rdzv-endpoint=localhost:29500" in argv
    parse_stage("tinyllm_mcore.stages.sft", argv[argv.index("tinyllm_mcore.stages.sft") + 1:])


def test_grpo_example_sources_and_group_check(slurm, tmp_path):
    env, _ = slurm
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "1 + 1 =", "answer": "2"}\n{"prompt": "2 + 2 =", "answer": "4"}\n')
    (cmd,) = run_script("grpo_92m", env, PROMPTS=prompts, ANSWER_SCORER="math-verify", KL_BETA=0, HELDOUT_SIZE=1)
    args, _, _ = check_training_launch(cmd, "tinyllm_mcore.stages.grpo", nodes=1)
    assert (args.prompts, args.answer_scorer, args.task, args.kl_beta, args.ref_load, args.heldout_size) == \
        (str(prompts), "math-verify", None, 0.0, None, 1)
    (cmd,) = run_script("grpo_92m", env, TASK="countdown", TASK_CONFIG='{"min_numbers": 3}')
    args, _, _ = check_training_launch(cmd, "tinyllm_mcore.stages.grpo", nodes=1)
    assert (args.task, args.task_config) == ("countdown", '{"min_numbers": 3}')
    proc = subprocess.run(["bash", str(EXAMPLES / "grpo_92m.sh")], capture_output=True, text=True, cwd=REPO,
                          env={**env, "SLURM_JOB_NUM_NODES": "1", "GLOBAL_BATCH": "96", "MICRO_BATCH": "4"}, timeout=60)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith("error: GLOBAL_BATCH=96")
