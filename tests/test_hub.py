"""Hub access follows HF conventions: rlx sets no HF_HUB_OFFLINE, the embedded default opens no connection, and
a model or dataset that cannot be fetched is named with how to point at a local copy or go online."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

FAKE_MODEL = "rlx-test-nobody/no-such-model-7f3a"
FAKE_DATASET = "rlx-test-nobody/no-such-dataset-7f3a"

# Any TCP/UDP connection or DNS lookup (other than localhost) fails and is recorded, then the default recipe runs.
NO_NETWORK = """
import json, socket, sys
attempts = []
local = ("localhost", "127.0.0.1", "::1", None, "")
_connect, _getaddrinfo = socket.socket.connect, socket.getaddrinfo
def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in local:
        attempts.append(repr(address)); raise OSError("network blocked by the test")
    return _connect(self, address)
def getaddrinfo(host, *args, **kwargs):
    if host not in local:
        attempts.append(f"dns {host}"); raise OSError("network blocked by the test")
    return _getaddrinfo(host, *args, **kwargs)
socket.socket.connect, socket.getaddrinfo = connect, getaddrinfo
sys.path.insert(0, sys.argv[1])
from rlx._entry import prepare_process
prepare_process(sys.argv[1] + "/rlx/train.py")
import os
from rlx.train import main
main(sys.argv[2:])
print("RLX_NET " + json.dumps({"attempts": attempts, "offline": os.environ.get("HF_HUB_OFFLINE")}))
"""


def test_embedded_default_opens_no_connection_and_sets_no_offline_flag(tmp_path, tiny_model_dir):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")}
    env["OMP_NUM_THREADS"] = "2"
    args = [
        "recipe=grpo_tiny",  # model.name_or_path=embedded: the cached warm start (tiny_model_dir built it)
        f"output_dir={tmp_path / 'run'}",
        "trainer.max_steps=1",
        "trainer.per_device_train_batch_size=8",
        "trainer.num_generations=4",
        "eval.num_prompts=4",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", NO_NETWORK, str(REPO), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RLX_NET "))
    seen = json.loads(line.removeprefix("RLX_NET "))
    assert seen["attempts"] == [], seen["attempts"]
    assert seen["offline"] is None, "rlx must not set HF_HUB_OFFLINE"
    assert (tmp_path / "run" / "final" / "config.json").exists()


def test_unreachable_model_names_the_id_and_both_ways_out(monkeypatch):
    from rlx.errors import UserError
    from rlx.models import load_causal_lm, load_tokenizer_for

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what the message reports; huggingface_hub read it at import
    for load in (load_causal_lm, load_tokenizer_for):
        with pytest.raises(UserError) as e:
            load(FAKE_MODEL)
        msg = str(e.value)
        assert f"'{FAKE_MODEL}' is read as a Hugging Face Hub model id" in msg
        assert "HF_HUB_OFFLINE is set, so only the local HF cache was searched" in msg
        assert "set model.name_or_path to an HF-format directory" in msg
        assert f"hf download {FAKE_MODEL} --local-dir DIR" in msg
        assert "unset HF_HUB_OFFLINE" in msg and "HF_ENDPOINT" in msg


def test_unreachable_dataset_names_the_id_and_both_ways_out(monkeypatch):
    from rlx.errors import UserError
    from rlx.tasks.data import load_split

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as e:
        load_split(FAKE_DATASET, "train")
    msg = str(e.value)
    assert msg.startswith(f"cannot load dataset '{FAKE_DATASET}' (config=None, split=train): ")
    assert f"'{FAKE_DATASET}' is read as a Hugging Face Hub dataset id" in msg
    assert "HF_HUB_OFFLINE is set" in msg
    assert "set task.dataset (task.eval_dataset for the held-out split) to a local .jsonl" in msg
    assert f"hf download {FAKE_DATASET} --repo-type dataset --local-dir DIR" in msg
    assert "unset HF_HUB_OFFLINE" in msg


def test_hub_hint_online_and_local_path_wording(monkeypatch, tmp_path):
    from rlx.errors import hub_hint

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example")
    online = hub_hint(FAKE_MODEL, "model.name_or_path")
    assert "(from https://mirror.example)" in online and "only the local HF cache" not in online
    assert hub_hint(str(tmp_path), "model.name_or_path").startswith("Set model.name_or_path to an HF-format")
    assert "a local .jsonl/.json/.parquet/.csv file" in hub_hint(
        "./data.jsonl", "task.dataset", kind="dataset"
    )


def test_entry_sets_no_hub_offline_flag(monkeypatch):
    from rlx._entry import prepare_process

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    prepare_process(str(REPO / "rlx" / "train.py"))
    assert "HF_HUB_OFFLINE" not in os.environ
