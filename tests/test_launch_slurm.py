"""The SLURM launcher (launch/slurm/): what each node runs, derived from SLURM's variables, and
its refusals. SLURM is not installed in CI: `DRY_RUN=1` prints the srun and torchrun commands
(run.sh, node.sh), `scontrol` is a stub that expands the node list, and the last test runs
node.sh for real (torchrun, 2 CPU processes, the tiny job for one step) as srun would start it
on the first node of a one-node job.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "launch" / "slurm" / "run.sh"


def _slurm_env(tmp_path: Path, **overrides: str) -> dict:
    """A 4-node job's variables on node 2, `scontrol show hostnames` answered by a stub."""
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    scontrol = stub / "scontrol"
    scontrol.write_text("#!/bin/sh\n[ \"$1 $2 $3\" = 'show hostnames gpu-a[07-10]' ] || exit 3\n"
                        "printf 'gpu-a07\\ngpu-a08\\ngpu-a09\\ngpu-a10\\n'\n")
    scontrol.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MASTER_", "NCCL_")) and k not in (
               "TP", "PP", "EP", "GPUS_PER_NODE", "NNODES", "DRY_RUN", "CONTAINER_IMAGE")}
    env.update(PATH=f"{stub}:{env['PATH']}", SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_ID="4242",
               SLURM_JOB_NUM_NODES="4", SLURM_JOB_NODELIST="gpu-a[07-10]", SLURM_NODEID="2",
               SLURM_GPUS_ON_NODE="8", SLURM_CPUS_ON_NODE="64", DRY_RUN="1")
    env.update(overrides)
    return env


def _run(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(RUN), *args], env=env, capture_output=True, text=True,
                          timeout=60)


def test_each_node_runs_torchrun_with_its_rank_and_the_first_nodes_rendezvous(tmp_path):
    proc = _run(_slurm_env(tmp_path, PP="4", EP="8"), "--preset", "proxy", "--steps", "5")
    assert proc.returncode == 0, proc.stderr
    srun, torchrun = (shlex.split(line) for line in proc.stdout.strip().splitlines())
    assert srun[:8] == ["srun", "--nodes", "4", "--ntasks", "4", "--ntasks-per-node", "1",
                        "--kill-on-bad-exit=1"]
    assert srun[-4:] == ["--preset", "proxy", "--steps", "5"]
    options = dict(zip(torchrun[3:17:2], torchrun[4:17:2]))
    assert torchrun[:3] == ["python3", "-m", "torch.distributed.run"]
    assert options == {"--nnodes": "4", "--nproc-per-node": "8", "--node-rank": "2",
                       "--master-addr": "gpu-a07", "--master-port": str(20000 + 4242),
                       "--max-restarts": "0", "-m": "megatron_dsv3.train"}
    assert torchrun[17:] == ["--tensor-parallel-size", "1", "--pipeline-parallel-size", "4",
                             "--expert-parallel-size", "8", "--pipeline-schedule", "dualpipev",
                             "--preset", "proxy", "--steps", "5"]
    assert "32 processes, TP=1, PP=4, DP=8, EP=8; rendezvous gpu-a07:24242" in proc.stderr


def test_variables_override_slurm_and_a_container_wraps_srun(tmp_path):
    env = _slurm_env(tmp_path, NNODES="2", GPUS_PER_NODE="4", MASTER_ADDR="10.0.0.5",
                     MASTER_PORT="29400", TP="2", PIPELINE_SCHEDULE="dualpipe",
                     CONTAINER_IMAGE="nvcr.io#nvidia/pytorch:25.10-py3", PYTHON="/opt/py")
    proc = _run(env)
    assert proc.returncode == 0, proc.stderr
    srun, torchrun = (shlex.split(line) for line in proc.stdout.strip().splitlines())
    assert srun[srun.index("--container-image") + 1] == "nvcr.io#nvidia/pytorch:25.10-py3"
    assert srun[srun.index("--container-mounts") + 1] == f"{ROOT}:{ROOT}"
    assert srun[srun.index("--nodes") + 1] == "2"
    assert torchrun[0] == "/opt/py"
    assert torchrun[torchrun.index("--nproc-per-node") + 1] == "4"
    assert torchrun[torchrun.index("--master-addr") + 1] == "10.0.0.5"
    assert torchrun[torchrun.index("--master-port") + 1] == "29400"
    assert torchrun[torchrun.index("--tensor-parallel-size") + 1] == "2"
    assert "--pipeline-schedule" not in torchrun, "PP = 1: no schedule"


@pytest.mark.parametrize("overrides, expected", [
    ({"EP": "64"}, "EP=64 must divide the data-parallel size NNODES * GPUS_PER_NODE / (TP * PP) "
                   "= 32"),
    ({"TP": "3"}, "TP * PP = 3 must divide NNODES * GPUS_PER_NODE=32"),
    ({"PP": "0"}, "PP=0 must be a positive integer"),
    ({"GPUS_PER_NODE": "eight"}, "GPUS_PER_NODE=eight must be a positive integer"),
    ({"SLURM_JOB_NUM_NODES": ""}, "SLURM_JOB_NUM_NODES is unset: set NNODES"),
])
def test_a_layout_that_does_not_fit_is_refused_naming_the_variable(overrides, expected,
                                                                     tmp_path):
    env = _slurm_env(tmp_path, **overrides)
    if overrides.get("SLURM_JOB_NUM_NODES") == "":
        del env["SLURM_JOB_NUM_NODES"]
    proc = _run(env)
    assert proc.returncode != 0 and expected in proc.stderr, proc.stderr
    assert proc.stdout == "", "nothing may be started"


def test_node_script_starts_the_job_on_this_machine(tmp_path):
    """What srun runs on node 0 of a one-node job: torchrun with 2 CPU processes, one step."""
    env = _slurm_env(tmp_path, DRY_RUN="0", SLURM_JOB_NUM_NODES="1", SLURM_NODEID="0",
                     GPUS_PER_NODE="2", MASTER_ADDR="127.0.0.1", PYTHON=sys.executable,
                     TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    env["MASTER_PORT"] = str(20000 + os.getpid() % 20000)
    env.update(REPO=str(ROOT), NNODES="1", ENTRY="megatron_dsv3.train",
               LAYOUT_ARGS="--tensor-parallel-size 1 --pipeline-parallel-size 1 "
                           "--expert-parallel-size 1")
    out = tmp_path / "run"
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "slurm" / "node.sh"), "--steps", "1", "--seq-len", "16",
         "--grad-accum", "1", "--warmup-steps", "1", "--eval-interval", "0", "--no-wandb",
         "--out-dir", str(out)], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dp=2" in proc.stderr, proc.stderr[-2000:]
    assert (out / "checkpoints" / "step_1" / "rank_00001.pt").is_file()
