"""Every Slurm example through `sbatch` on a real two-node cluster (examples/local_slurm.sh), at the tiny preset, the way
a user runs them: preprocess -> pretrain on 2 nodes x 1 process (DP=2, the distributed optimizer as shipped) ->
re-submitted, it resumes from its own save -> SFT -> DPO -> HF export, which loads with AutoModelForCausalLM and
generates. Then time limits and preemption: the signal before a 2-minute limit saves and exits 0, the re-submitted job
resumes, is requeued mid-run and resumes again. Every pretraining curve equals one uninterrupted single-machine run
(`torchrun --nproc-per-node 2` through the same script, outside Slurm)."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.harness.distributed import free_port
from tests.harness.slurm_cluster import CPU_JOB, EXAMPLES, REPO, job_log, local_slurm_fixture

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

local_slurm = pytest.fixture(scope="session")(local_slurm_fixture)

# Tiny settings shared by every pretraining run: seq 64, 2 sequences per step over DP=2, far more iterations than fit
# in the time-limit test's 2 minutes. Each run stops at an --exit-interval (EXTRA_ARGS) instead, so all of them follow
# the same LR schedule and can be compared with one uninterrupted run of STOP_AT iterations. Saves come from the stops
# and the signal handler only (no interval saves).
STOP_AT = 150  # room for the ~0.5 s it takes a signal to arrive, at ~15-100 ms per iteration
PRETRAIN = dict(MODEL_SIZE="tiny", GPUS_PER_NODE=1, MICRO_BATCH=1, GLOBAL_BATCH=2, SEQ_LENGTH=64, EVAL_ITERS=1,
                LOG_INTERVAL=1, TRAIN_ITERS=100000, SAVE_INTERVAL=100000, EVAL_INTERVAL=100000)


def stop_at(iteration: int) -> str:
    return f"--split 90,5,5 --exit-interval {iteration}"  # a small corpus: 5% validation and test
TWO_NODES = ("--nodes=2", "--ntasks-per-node=1", *CPU_JOB)


def train_losses(metrics: Path) -> dict[int, float]:
    """iteration -> training loss; a later record of an iteration (a re-run after a resume) replaces the earlier."""
    losses = {}
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if "lm loss" in record and record.get("split", "train") == "train":
            losses[record["iteration"]] = record["lm loss"]
    return losses


def latest_iteration(save: Path) -> int:
    return int((save / "latest_checkpointed_iteration.txt").read_text())


@pytest.fixture(scope="module")
def prepared(local_slurm, tmp_path_factory):
    """examples/preprocess_corpus.sh as a job: a tokenizer trained on a small corpus, its indexed dataset, and the
    SFT and DPO inputs. Returns (cluster, work dir, log dir)."""
    from tinyllm_mcore.quickstart.corpus import build_corpus

    root = tmp_path_factory.mktemp("slurm")
    raw = build_corpus(seed=3, num_countries=6, num_unseen=1, num_no_preference=1, docs_per_country=8).write(root / "raw")
    work, logs = root / "work", root / "logs"
    logs.mkdir()
    env = local_slurm.env(WORK_DIR=work, CORPORA=f"wiki={raw['pretrain']}", SFT_INPUT=raw["sft"],
                          DPO_INPUT=raw["dpo"], VOCAB_SIZE=600, WORKERS=1)
    job, log = local_slurm.run("preprocess_corpus.sh", *CPU_JOB, env=env, log_dir=logs)
    assert job["JobName"] == "tinyllm-preprocess"
    assert (work / "tokenizer" / "tokenizer.model").is_file()
    for prefix in ("wiki_text_document", "sft_sft_document", "dpo_preference_document"):
        assert (work / "data" / f"{prefix}.bin").stat().st_size > 0 and (work / "data" / f"{prefix}.idx").is_file()
        assert f"wrote {work / 'data' / prefix}.bin" in log
    return local_slurm, work, logs


def pretrain_env(cluster, work: Path, **overrides):
    """Pretraining on the prepared work dir's tokenizer and data; overrides (e.g. WORK_DIR, SAVE) win."""
    settings = dict(WORK_DIR=work, TOKENIZER=work / "tokenizer", DATA_PATH=work / "data" / "wiki_text_document",
                    **PRETRAIN)
    return cluster.env(**{**settings, **overrides})


@pytest.fixture(scope="module")
def uninterrupted(prepared, tmp_path_factory) -> dict[int, float]:
    """The reference curve: the same script and settings on one machine outside Slurm (torchrun, 2 processes)."""
    cluster, work, _ = prepared
    out = tmp_path_factory.mktemp("single_machine")
    env = pretrain_env(cluster, work, WORK_DIR=out, NNODES=1, GPUS_PER_NODE=2, MASTER_PORT=free_port(),
                       EXTRA_ARGS=stop_at(STOP_AT))
    del env["SLURM_CONF"]
    proc = subprocess.run(["bash", str(EXAMPLES / "pretrain_92m_multinode.sh")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch.distributed.run --nnodes=1 --nproc-per-node=2" in proc.stderr
    losses = train_losses(out / "runs" / "pretrain" / "metrics.jsonl")
    assert sorted(losses) == list(range(1, STOP_AT + 1))
    return losses


def test_every_example_through_sbatch(prepared, uninterrupted):
    cluster, work, logs = prepared
    # Pretrain on 2 nodes x 1 process, stopped after iteration 2 (its save), then re-submitted: it resumes from its
    # own save and goes on to iteration 4, with the single-machine run's losses.
    env = pretrain_env(cluster, work, EXTRA_ARGS=stop_at(2))
    job, log = cluster.run("pretrain_92m_multinode.sh", *TWO_NODES, env=env, log_dir=logs)
    assert job["NumNodes"] == "2" and job["NodeList"] == "n[1-2]"
    assert "TP=1 PP=1 DP=2" in log and "--use-distributed-optimizer" in log
    save = work / "checkpoints" / "pretrain"
    assert latest_iteration(save) == 2 and (save / "iter_0000002" / "metadata.json").is_file()

    env["EXTRA_ARGS"] = stop_at(4)
    job, log = cluster.run("pretrain_92m_multinode.sh", *TWO_NODES, env=env, log_dir=logs)
    assert f"loaded {save} at iteration 2" in log and latest_iteration(save) == 4
    losses = train_losses(work / "runs" / "pretrain" / "metrics.jsonl")
    assert losses == {i: uninterrupted[i] for i in range(1, 5)}

    # SFT from the pretrained checkpoint on 1 node x 2 processes (DP=2, distributed optimizer), DPO on 1 x 1.
    post = dict(MODEL_SIZE="tiny", MICRO_BATCH=1, SEQ_LENGTH=64, TRAIN_ITERS=2, SAVE_INTERVAL=2, EVAL_INTERVAL=2,
                EVAL_ITERS=1, LOG_INTERVAL=1)
    env = cluster.env(WORK_DIR=work, GPUS_PER_NODE=2, GLOBAL_BATCH=2, **post)
    job, log = cluster.run("sft_92m.sh", "--ntasks-per-node=2", *CPU_JOB, env=env, log_dir=logs)
    assert "DP=2" in log and f"loaded {save}" in log and "--finetune" in log
    assert latest_iteration(work / "checkpoints" / "sft") == 2

    env = cluster.env(WORK_DIR=work, GPUS_PER_NODE=1, GLOBAL_BATCH=1, **post)
    job, log = cluster.run("dpo_92m.sh", "--ntasks-per-node=1", *CPU_JOB, env=env, log_dir=logs)
    assert f"--ref-load {work / 'checkpoints' / 'sft'}" in log
    assert latest_iteration(work / "checkpoints" / "dpo") == 2

    # GRPO from the SFT checkpoint on 1 node x 2 processes (DP=2: one group of 8 per rank), KL to the SFT reference
    grpo = {**post, "SEQ_LENGTH": 256, "MICRO_BATCH": 4, "GROUP_SIZE": 8, "MAX_NEW_TOKENS": 8, "HELDOUT_SIZE": 8}
    env = cluster.env(WORK_DIR=work, GPUS_PER_NODE=2, GLOBAL_BATCH=16, **grpo,
                      EXTRA_ARGS="--max-zero-accuracy-intervals 0")
    job, log = cluster.run("grpo_92m.sh", "--ntasks-per-node=2", *CPU_JOB, env=env, log_dir=logs)
    assert "DP=2" in log and f"--ref-load {work / 'checkpoints' / 'sft'}" in log and "--task chain_sum" in log
    assert latest_iteration(work / "checkpoints" / "grpo") == 2
    records = [json.loads(line) for line in (work / "runs" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert len(train) == 2 and all("reward mean" in r and "zero-variance groups" in r for r in train)
    # a tiny SFT model may tie every group (no update, no loss reports); where it updated, the KL is reported
    assert all("kl" in r for r in train if "grpo loss" in r)
    assert any("heldout accuracy" in r for r in records)

    job, log = cluster.run("convert_to_hf.sh", *CPU_JOB, env=cluster.env(WORK_DIR=work), log_dir=logs)
    assert f"--load {work / 'checkpoints' / 'dpo'}" in log
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(work / "hf")
    model = AutoModelForCausalLM.from_pretrained(work / "hf")
    prompt = tokenizer("中国的首都是", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def wait_for_iteration(cluster, job_id: str, metrics: Path, iteration: int, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not (metrics.is_file() and max(train_losses(metrics), default=0) >= iteration):
        job = cluster.job(job_id)
        assert job["JobState"] in ("PENDING", "RUNNING"), f"job {job_id} ended early: {job}\n{job_log(job)}"
        assert time.monotonic() < deadline, f"job {job_id} did not reach iteration {iteration}"
        time.sleep(0.2)


def test_time_limit_signal_and_requeue_resume_exactly(prepared, uninterrupted, tmp_path):
    cluster, work, logs = prepared
    save, metrics = tmp_path / "save", tmp_path / "metrics.jsonl"
    env = pretrain_env(cluster, work, SAVE=save, RUN_DIR=tmp_path, EXTRA_ARGS=stop_at(STOP_AT))
    # A 2-minute limit. The scripts ask for SIGTERM 120 s before the limit, which here would be at once (before
    # Python has started), so this job asks for it 15 s before; the test sends it earlier itself, once training is
    # under way. `scancel --signal=TERM` (no --batch/--full) signals the job's steps, i.e. the srun-launched ranks,
    # as #SBATCH --signal does; the batch shell goes on and exits with srun's status.
    job_id = cluster.submit("pretrain_92m_multinode.sh", *TWO_NODES, "--time=00:02:00", "--signal=TERM@15",
                            env=env, log_dir=logs)
    wait_for_iteration(cluster, job_id, metrics, 3)
    cluster.scontrol("cancel", "--signal=TERM", job_id)
    job = cluster.wait(job_id, timeout_s=150)
    log = job_log(job)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), f"{job}\n{log}"
    signalled = max(train_losses(metrics))
    assert 3 <= signalled < STOP_AT // 3, log
    assert f"exiting at iteration {signalled}: received SIGTERM" in log
    assert latest_iteration(save) == signalled and (save / f"iter_{signalled:07d}" / "metadata.json").is_file()

    # Re-submitted, it resumes from that checkpoint; requeued mid-run (`scontrol requeue`: SIGTERM to every process of
    # the job, SIGKILL after KillWait, back in the queue), it saves, restarts under the same id and resumes again.
    job_id = cluster.submit("pretrain_92m_multinode.sh", *TWO_NODES, env=env, log_dir=logs)
    wait_for_iteration(cluster, job_id, metrics, signalled + 3)
    cluster.scontrol("requeue", job_id)
    cluster.wait(job_id, states={"PENDING"}, timeout_s=60)
    cluster.scontrol("update", f"JobId={job_id}", "StartTime=now")  # a requeued job is otherwise held ~3 minutes
    job = cluster.wait(job_id, timeout_s=300)
    log = job_log(job)  # --open-mode=append: both runs of the job
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), f"{job}\n{log}"
    assert "DUE TO JOB REQUEUE" in log
    assert f"loaded {save} at iteration {signalled}" in log
    assert "exiting at iteration " in log, f"the requeue's SIGTERM did not save:\n{log}"
    requeued = int(log.split("exiting at iteration ")[1].split(":")[0])
    assert signalled < requeued < STOP_AT and f"loaded {save} at iteration {requeued}" in log, log
    assert latest_iteration(save) == STOP_AT
    # nothing lost, nothing changed: the three runs make up the uninterrupted curve
    assert train_losses(metrics) == uninterrupted
