"""The SLURM template: bash syntax, and the `accelerate launch` line it renders from a fake 2 x 8 GPU job."""

from __future__ import annotations

import os
import shlex
import subprocess
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
    assert argv[-3:] == ["rlx/train.py", "recipe=grpo_qwen3_4b", "x.y=a b"]
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
