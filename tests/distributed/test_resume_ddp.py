"""Exact resume through the 2-process CPU DDP launch: kill -9 (rank 0), resume, same metrics and weights."""

from __future__ import annotations

import socket
import sys

import pytest

from tests.conftest import REPO
from tests.test_resume import GRPO, assert_same_metrics, assert_same_weights, killed_and_resumed, rows, train


def _launcher() -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "accelerate_configs" / "cpu_ddp.yaml"),
        "--main_process_port",
        str(port),
    ]


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_resume_equals_straight(tmp_path, tiny_model_dir):
    args = [a.replace("per_device_train_batch_size=32", "per_device_train_batch_size=16") for a in GRPO]
    straight = tmp_path / "straight"
    p = train(straight, args, launcher=_launcher())
    assert p.returncode == 0, p.stderr[-4000:]
    assert (straight / "checkpoint-3" / "rlx_state.rank1.pt").exists()  # both ranks' state is checkpointed
    run = killed_and_resumed(tmp_path, args, ["after_log:4"], launcher=_launcher())
    assert [r["step"] for r in rows(run) if "train_runtime" not in r] == list(range(1, 7))
    assert_same_metrics(straight, run)
    assert_same_weights(straight, run)
