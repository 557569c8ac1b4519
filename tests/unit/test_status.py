import os
import time

from deepspec.cli import format_status
from deepspec.config import validate_config
from deepspec.heartbeat import HEARTBEAT_NAME, Heartbeat
from deepspec.manifest import MANIFEST_NAME
from deepspec.pipeline import stage_fingerprints
from deepspec.storage import open_storage


def make_config(root):
    return validate_config({"data": {"sources": [{"name": "gsm8k"}]}, "storage": {"root": str(root)}})


def states(text: str) -> dict[str, str]:
    rows = [line.split() for line in text.splitlines()[1:]]
    return {row[0]: row[1] for row in rows}


def test_status_tells_running_from_stopped(tmp_path):
    config = make_config(tmp_path / "runs")
    storage = open_storage(config)
    fingerprints = stage_fingerprints(config)
    prompts = storage.local_dir("prompts", fingerprints["prompts"])
    prompts.mkdir(parents=True)
    (prompts / MANIFEST_NAME).write_text("{}")
    regen = storage.local_dir("regen", fingerprints["regen"])
    Heartbeat(regen, enabled=True).beat()
    cache = storage.local_dir("cache", fingerprints["cache"])
    Heartbeat(cache, enabled=True).beat()
    old = time.time() - 3600
    os.utime(cache / HEARTBEAT_NAME, (old, old))
    train = storage.local_dir("train", fingerprints["train"])
    train.mkdir(parents=True)

    found = states(format_status(config, storage))
    assert found == {"prompts": "done", "regen": "running", "cache": "stopped", "train": "stopped", "eval": "waiting"}


def test_heartbeat_removed_when_stage_ends(tmp_path):
    with Heartbeat(tmp_path / "out", interval_s=0.01):
        assert (tmp_path / "out" / HEARTBEAT_NAME).is_file()
        time.sleep(0.05)
    assert not (tmp_path / "out" / HEARTBEAT_NAME).exists()


def test_heartbeat_of_dead_process_means_stopped(tmp_path):
    import json
    import socket
    import subprocess
    import sys

    config = make_config(tmp_path / "runs")
    storage = open_storage(config)
    regen = storage.local_dir("regen", stage_fingerprints(config)["regen"])
    regen.mkdir(parents=True)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    payload = {"host": socket.gethostname(), "pid": dead_pid, "time": time.time()}
    (regen / HEARTBEAT_NAME).write_text(json.dumps(payload))
    assert states(format_status(config, storage))["regen"] == "stopped"
