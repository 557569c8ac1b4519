"""A file that a running stage rewrites every minute, so ``deepspec status`` can tell running from stopped.

While a stage runs, ``<output>/.heartbeat`` is rewritten every ``interval_s``
seconds with the host, pid and time, and removed when the stage ends. A stage
output without a manifest and without a recent heartbeat therefore belongs to a
run that failed or was killed. The next run resumes it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from deepspec.manifest import atomic_write_text

HEARTBEAT_NAME = ".heartbeat"
HEARTBEAT_INTERVAL_S = 60.0
# A heartbeat older than this many intervals means the writer has stopped.
STALE_AFTER_INTERVALS = 3


class Heartbeat:
    """Rewrite ``directory/.heartbeat`` every ``interval_s`` seconds while the ``with`` block runs."""

    def __init__(self, directory: Path, interval_s: float = HEARTBEAT_INTERVAL_S, enabled: bool = True) -> None:
        self.path = Path(directory) / HEARTBEAT_NAME
        self.interval_s = interval_s
        self.enabled = enabled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        atomic_write_text(self.path, json.dumps(payload))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except OSError:
                # A full or vanished volume must not stop the stage. Status then reports the stage as stopped.
                continue

    def __enter__(self) -> Heartbeat:
        if self.enabled:
            self.beat()
            self._thread = threading.Thread(target=self._run, name="deepspec-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.path.unlink(missing_ok=True)


def is_fresh(age_s: float | None, interval_s: float = HEARTBEAT_INTERVAL_S, slack_s: float = 0.0) -> bool:
    """Return whether a heartbeat ``age_s`` seconds old comes from a stage that is still running."""
    return age_s is not None and age_s <= STALE_AFTER_INTERVALS * interval_s + slack_s


def writer_gone(path: Path) -> bool:
    """Return whether the heartbeat at ``path`` was written by a process of this host that no longer exists."""
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if payload.get("host") != socket.gethostname() or not isinstance(payload.get("pid"), int):
        return False
    try:
        os.kill(payload["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
