"""The SLURM template: bash syntax, the `accelerate launch` line it renders from a fake 2 x 8 GPU job, the whole
job run with stand-ins for srun/scontrol/accelerate, and the requeue on USR1."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM = REPO / "scripts" / "slurm"

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("name", ["train.sbatch", "render_launch.sh"])
def test_bash_syntax(name):
    subprocess.run(["bash", "-n", str(SLURM / name)], check=True)


def _fake_scontrol(tmp_path: Path) -> Path:
    """A `scontrol show hostnames` stand-in that expands gpu-node[07-08] the way SLURM does."""
    bin_dir = tmp_path / "bin"
    if bin_dir.exists():
        return bin_dir
    bin_dir.mkdir()
    fake = bin_dir / "scontrol"
    fake.write_text(
        '#!/usr/bin/env bash\n[[ "$1 $2" == "show hostnames" ]] || exit 1\n'
        '[[ "$3" == "gpu-node[07-08]" ]] && printf "gpu-node07\\ngpu-node08\\n" && exit 0\nexit 1\n'
    )
    fake.chmod(0o755)
    return bin_dir


def _render(tmp_path: Path, node_id: int, **extra: str) -> list[str]:
    env = {
        "PATH": f"{_fake_scontrol(tmp_path)}:{os.environ['PATH']}",
        "SLURM_NNODES": "2",
        "SLURM_NODEID": str(node_id),
        "SLURM_PROCID": str(node_id),
        "SLURM_JOB_NODELIST": "gpu-node[07-08]",
        "SLURM_GPUS_ON_NODE": "8",
        "MAIN_PROCESS_PORT": "29517",
        **extra,
    }
    out = subprocess.run(
        [
            "bash",
            str(SLURM / "render_launch.sh"),
            "accelerate_configs/multi_node.yaml",
            "recipe=grpo_qwen3_4b",
            "x.y=a b",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    return shlex.split(out.stdout.strip())


def _opt(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


@pytest.mark.parametrize("node_id", [0, 1])
def test_render_two_nodes_eight_gpus(tmp_path, node_id):
    argv = _render(tmp_path, node_id)
    assert argv[:2] == ["accelerate", "launch"]
    assert _opt(argv, "--config_file") == "accelerate_configs/multi_node.yaml"
    assert _opt(argv, "--num_machines") == "2"
    assert _opt(argv, "--num_processes") == "16"
    assert _opt(argv, "--machine_rank") == str(node_id)
    assert _opt(argv, "--main_process_ip") == "gpu-node07"
    assert _opt(argv, "--main_process_port") == "29517"
    # the script and its overrides come last, quoting preserved
    assert argv[-4:] == ["-m", "rlx.train", "recipe=grpo_qwen3_4b", "x.y=a b"]
    assert (REPO / _opt(argv, "--config_file")).exists()


def test_render_gpu_count_fallbacks(tmp_path):
    # SLURM_GPUS_ON_NODE may be absent (GPUS_PER_NODE used) or typed ("h100:4"); node rank from SLURM_PROCID.
    argv = _render(tmp_path, 1, SLURM_GPUS_ON_NODE="h100:4")
    assert _opt(argv, "--num_processes") == "8"
    env_argv = _render(tmp_path, 0, SLURM_GPUS_ON_NODE="", GPUS_PER_NODE="2")
    assert _opt(env_argv, "--num_processes") == "4"


def test_render_outside_allocation_fails(tmp_path):
    out = subprocess.run(
        ["bash", str(SLURM / "render_launch.sh"), "accelerate_configs/multi_node.yaml", "recipe=x"],
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0 and "SLURM_NNODES" in out.stderr


def _fake_cluster(tmp_path: Path) -> tuple[Path, Path]:
    """srun, scontrol and accelerate stand-ins: srun runs its command once per node, accelerate records its argv."""
    bin_dir = tmp_path / "cluster"
    log = tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\n"
        'while [[ "$1" == --* ]]; do shift; done\n'
        '[[ -n "${FAKE_SRUN_BLOCK:-}" ]] && { touch "$FAKE_LOG/srun.started"; exec sleep 60; }\n'
        'for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" || exit $?; done\n'
    )
    (bin_dir / "scontrol").write_text(
        "#!/usr/bin/env bash\n"
        '[[ "$1" == requeue ]] && { echo "requeue $2" >> "$FAKE_LOG/scontrol"; exit 0; }\n'
        '[[ "$1 $2 $3" == "show hostnames gpu-node[07-08]" ]] && printf "gpu-node07\\ngpu-node08\\n" && exit 0\n'
        "exit 1\n"
    )
    (bin_dir / "accelerate").write_text(
        '#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$FAKE_LOG/node${SLURM_NODEID}.argv"\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir, log


def _job_env(bin_dir: Path, log: Path, **extra: str) -> dict[str, str]:
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": os.environ.get("HOME", "/tmp"),
        "FAKE_LOG": str(log),
        "RLX_ACCELERATE": str(bin_dir / "accelerate"),
        "RLX_REPO": str(REPO),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "relax4b",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "gpu-node[07-08]",
        "SLURM_GPUS_ON_NODE": "8",
        **extra,
    }


def _sbatch_options() -> dict[str, str]:
    opts = {}
    for line in (SLURM / "train.sbatch").read_text().splitlines():
        if line.startswith("#SBATCH --"):
            k, _, v = line[len("#SBATCH --") :].partition("=")
            opts[k] = v
    return opts


def test_sbatch_header_needs_no_directory_and_requeues():
    opts = _sbatch_options()
    assert "/" not in opts["output"]  # SLURM opens the log before the script runs: no directory to create
    assert opts["open-mode"] == "append"  # a requeued job adds to its log
    assert "requeue" in opts
    assert opts["signal"].startswith("B:USR1@")
    text = (SLURM / "train.sbatch").read_text()
    for name in ("NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE", "NCCL_DEBUG", "TORCH_NCCL_ASYNC_ERROR_HANDLING"):
        assert name in text
    # the environment variables the scripts document are the ones they read
    launch = (SLURM / "render_launch.sh").read_text()
    assert "RLX_PYTHON" not in launch + text and "${RLX_ACCELERATE" in launch and "RLX_ACCELERATE" in text


def test_job_renders_two_nodes_with_resume_in_place(tmp_path):
    bin_dir, log = _fake_cluster(tmp_path)
    out = subprocess.run(
        ["bash", str(SLURM / "train.sbatch"), "recipe=grpo_qwen3_4b", "trainer.max_steps=500"],
        env=_job_env(bin_dir, log),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    for node in (0, 1):
        argv = (log / f"node{node}.argv").read_text().splitlines()
        assert argv[0] == "launch"
        assert _opt(argv, "--config_file") == "accelerate_configs/multi_node.yaml"
        assert _opt(argv, "--num_machines") == "2" and _opt(argv, "--num_processes") == "16"
        assert _opt(argv, "--machine_rank") == str(node)
        assert _opt(argv, "--main_process_ip") == "gpu-node07"
        assert _opt(argv, "--main_process_port") == str(29500 + 4242 % 1000)
        # resume in place: a fixed run dir per job name, then the user's arguments (which may override it)
        assert argv[argv.index("-m") :] == [
            "-m",
            "rlx.train",
            "trainer.resume_from_checkpoint=true",
            "output_dir=runs/slurm/relax4b",
            "recipe=grpo_qwen3_4b",
            "trainer.max_steps=500",
        ]


def test_usr1_requeues_the_job(tmp_path):
    bin_dir, log = _fake_cluster(tmp_path)
    with open(tmp_path / "job.out", "w") as out:
        proc = subprocess.Popen(
            ["bash", str(SLURM / "train.sbatch"), "recipe=grpo_qwen3_4b"],
            env=_job_env(bin_dir, log, FAKE_SRUN_BLOCK="1"),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            start_new_session=True,
        )
    try:
        deadline = time.time() + 30
        while not (log / "srun.started").exists():
            assert time.time() < deadline and proc.poll() is None, "srun was never started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 delivers to the batch shell
        returncode = proc.wait(timeout=20)  # at once: not after the 60 s the stand-in srun runs
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the stand-in srun (real SLURM ends it on requeue)
    assert returncode == 0, (tmp_path / "job.out").read_text()
    assert (log / "scontrol").read_text().split() == ["requeue", "4242"]
    assert "requeueing job 4242" in (tmp_path / "job.out").read_text()
