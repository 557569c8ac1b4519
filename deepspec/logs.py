"""One log line format for every stage, readable in ``kubectl logs``.

Lines look like::

    2026-12-04T21:40:02Z INFO stage=cache rank=0 | records=512/1000 rate=85.3/s eta=6s | shard 3 closed

``Progress`` emits such a line at a fixed interval and at the end, with the
done/total count, the rate and the ETA. On a terminal it draws a tqdm bar in
place of the interval lines.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from tqdm import tqdm

_STAGE = "-"
_RANK = 0


class _StageFormatter(logging.Formatter):
    converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", self.converter(record.created))
        message = record.getMessage()
        line = f"{stamp} {record.levelname} stage={_STAGE} rank={_RANK} | {message}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(stage: str, level: int = logging.INFO) -> None:
    """Configure the root logger for one stage process; RANK comes from the torchrun environment."""
    global _STAGE, _RANK
    _STAGE = stage
    _RANK = int(os.environ.get("RANK", "0"))
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_StageFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub", "botocore", "boto3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Progress bars of weight loading would interleave with the fixed-format lines.
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def set_stage(stage: str) -> None:
    """Change the ``stage=`` field of later lines, e.g. when ``deepspec run`` moves to the next stage."""
    global _STAGE
    _STAGE = stage


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


class Progress:
    """Log ``unit=done/total rate eta`` every ``interval_s`` seconds and once at the end."""

    def __init__(
        self, logger: logging.Logger, unit: str, total: int | None, interval_s: float = 10.0, start: int = 0
    ) -> None:
        self.logger = logger
        self.unit = unit
        self.total = total
        self.interval_s = interval_s
        self.done = start
        self._start_done = start
        self._started = time.monotonic()
        self._last = self._started
        self._bar: tqdm | None = None
        if sys.stdout.isatty():
            self._bar = tqdm(total=total, initial=start, unit=unit, dynamic_ncols=True, leave=False)

    def update(self, count: int = 1, note: str = "") -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
            if note:
                self._bar.set_postfix_str(note, refresh=False)
            return
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            self.logger.info(self.line(note))

    def line(self, note: str = "") -> str:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        rate = (self.done - self._start_done) / elapsed
        total = "?" if self.total is None else str(self.total)
        eta = "?"
        if self.total is not None and rate > 0:
            eta = format_duration((self.total - self.done) / rate)
        text = f"{self.unit}={self.done}/{total} rate={rate:.1f}/s eta={eta}"
        return f"{text} | {note}" if note else text

    def finish(self, note: str = "") -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.logger.info(self.line(note or "done"))
