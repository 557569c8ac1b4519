import io
import logging
import re

from deepspec.logs import Progress, format_duration, set_stage, setup_logging


def test_progress_line_has_count_rate_and_eta(caplog):
    logger = logging.getLogger("test.progress")
    with caplog.at_level(logging.INFO, logger="test.progress"):
        progress = Progress(logger, "records", total=4, interval_s=0)
        progress.update(1, note="part 0")
        progress.finish()
    lines = [record.getMessage() for record in caplog.records]
    assert re.fullmatch(r"records=1/4 rate=[0-9.]+/s eta=\S+ \| part 0", lines[0])
    assert lines[-1].startswith("records=1/4")
    assert lines[-1].endswith("| done")


def test_progress_on_terminal_draws_bar_then_logs_once(caplog, monkeypatch):
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    logger = logging.getLogger("test.progress.tty")
    with caplog.at_level(logging.INFO, logger="test.progress.tty"):
        progress = Progress(logger, "step", total=3, interval_s=0)
        progress.update(3)
        progress.finish()
    assert [record.getMessage().split(" ")[0] for record in caplog.records] == ["step=3/3"]


def test_log_line_format_names_stage_and_rank(monkeypatch, capsys):
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setenv("RANK", "3")
    setup_logging("cache")
    logging.getLogger("deepspec.test").info("hello")
    set_stage("train")
    logging.getLogger("deepspec.test").info("next")
    out = capsys.readouterr().out.splitlines()
    set_stage("-")
    assert re.fullmatch(r"\S+Z INFO stage=cache rank=3 \| hello", out[0])
    assert "stage=train rank=3 | next" in out[1]


def test_duration_formats():
    assert format_duration(59) == "59s"
    assert format_duration(125) == "2m05s"
    assert format_duration(7300) == "2h01m"
