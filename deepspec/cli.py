"""The ``deepspec`` command: one subcommand per stage, plus run, wait, status and toy-target.

Examples::

    deepspec run --config configs/demo.yaml
    deepspec train --config configs/demo.yaml --set train.lr=3e-4
    torchrun --standalone --nproc_per_node 2 -m deepspec.cli cache --config configs/demo.yaml
    deepspec wait cache --config configs/demo.yaml --timeout 3600
    deepspec status --config configs/demo.yaml

The config file comes from ``--config``, else the ``DEEPSPEC_CONFIG`` environment variable.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from deepspec.config import ConfigError, PipelineConfig, load_config
from deepspec.logs import set_stage, setup_logging
from deepspec.manifest import MANIFEST_NAME, StageError, StageInputError, read_manifest
from deepspec.pipeline import STAGES, stage_output
from deepspec.runtime import configure_runtime

logger = logging.getLogger("deepspec.cli")

# Stages that `deepspec run` starts under torchrun when their nproc_per_node is above 1.
DISTRIBUTED_STAGES = ("cache", "train")


def _stage_runner(stage: str) -> Callable[[PipelineConfig], Path]:
    if stage == "prompts":
        from deepspec.data.stage import run_prompts

        return run_prompts
    if stage == "regen":
        from deepspec.regen.stage import run_regen

        return run_regen
    if stage == "cache":
        from deepspec.cache.stage import run_cache

        return run_cache
    if stage == "train":
        from deepspec.train.stage import run_train

        return run_train
    if stage == "eval":
        from deepspec.eval.stage import run_eval

        return run_eval
    raise ValueError(f"unknown stage {stage!r}")


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepspec", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", help="pipeline YAML file (default: $DEEPSPEC_CONFIG)")
        sub.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override one config key, typed by the schema, e.g. --set train.lr=3e-4 (repeatable)",
        )
        return sub

    add("prompts", "read prompt sources, normalise, split train / held-out")
    add("regen", "regenerate assistant answers with the target")
    cache = add("cache", "capture target hidden states into the cache (run under torchrun for several ranks)")
    cache.add_argument("--finalize", action="store_true", help="only merge finished units into the final cache")
    add("train", "train the draft on the cache (run under torchrun for DDP)")
    add("eval", "speculative decoding on held-out prompts; report accepted length per benchmark")
    run = add("run", "run every stage in order, skipping stages whose output is current")
    run.add_argument("--until", choices=STAGES, help="stop after this stage")
    wait = add("wait", "block until a stage's output for this config exists")
    wait.add_argument("stage", choices=STAGES)
    wait.add_argument("--timeout", type=_non_negative, default=0, help="seconds to wait; 0 waits forever")
    wait.add_argument("--interval", type=_positive, default=10, help="seconds between checks")
    add("status", "show which stages are done, running or waiting for this config")
    add("toy-target", "build (or find in the cache) the toy target and print its directory and metrics")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_runtime()
    setup_logging(args.command)
    try:
        config = load_config(args.config, args.overrides)
        return _dispatch(args, config)
    except (ConfigError, StageInputError) as error:
        logger.error("%s", error)
        return 2
    except StageError as error:
        logger.error("%s", error)
        return 1
    except (FileNotFoundError, ValueError) as error:
        # Raised for bad input such as a missing source file; DEEPSPEC_DEBUG=1 shows the traceback.
        if os.environ.get("DEEPSPEC_DEBUG"):
            raise
        logger.error("%s: %s", type(error).__name__, error)
        return 2
    except KeyboardInterrupt:
        logger.error("interrupted; run the same command again to resume")
        return 130


def _dispatch(args: argparse.Namespace, config: PipelineConfig) -> int:
    command = args.command
    if command == "cache" and args.finalize:
        from deepspec.cache.stage import finalize_cache

        finalize_cache(config)
        return 0
    if command in STAGES:
        _stage_runner(command)(config)
        return 0
    if command == "run":
        return run_pipeline(config, args, until=args.until)
    if command == "wait":
        return wait_for_stage(config, args.stage, args.timeout, args.interval)
    if command == "status":
        print(format_status(config))
        return 0
    if command == "toy-target":
        from deepspec.targets.loading import resolve_target

        path = resolve_target(config)
        info_path = Path(path) / "toy_target.json"
        print(path)
        if info_path.is_file():
            print(info_path.read_text(encoding="utf-8"))
        return 0
    raise ValueError(f"unknown command {command!r}")


def run_pipeline(config: PipelineConfig, args: argparse.Namespace, until: str | None = None) -> int:
    """Run the stages in order; a stage whose manifest exists is skipped."""
    if read_manifest(stage_output(config, "cache")) is None:
        check_layer_ids_early(config)
    timings: dict[str, float] = {}
    skipped: set[str] = set()
    for stage in STAGES:
        output = stage_output(config, stage)
        started = time.monotonic()
        set_stage(stage)
        if read_manifest(output) is not None:
            logger.info("%s: up to date (%s)", stage, output)
            skipped.add(stage)
        elif stage in DISTRIBUTED_STAGES and _nproc(config, stage) > 1:
            _run_torchrun(stage, _nproc(config, stage), args)
        else:
            logger.info("%s: running", stage)
            _stage_runner(stage)(config)
        timings[stage] = time.monotonic() - started
        if stage == until:
            break
    set_stage("run")
    logger.info("stage wall times (s): %s", json.dumps({k: round(v, 1) for k, v in timings.items()}))
    # A fresh eval logs its report itself; an up-to-date one is shown here.
    report = stage_output(config, "eval") / "report.md"
    if "eval" in skipped and report.is_file():
        print(report.read_text(encoding="utf-8"))
    return 0


def check_layer_ids_early(config: PipelineConfig) -> None:
    """Validate ``cache.layer_ids`` against the target's depth before regen spends time on answers."""
    from transformers import AutoConfig

    from deepspec.targets.loading import num_target_layers, resolve_target, validate_layer_ids

    target_config = AutoConfig.from_pretrained(resolve_target(config), revision=config.target.revision)
    validate_layer_ids(list(config.cache.layer_ids), num_target_layers(target_config))


def _nproc(config: PipelineConfig, stage: str) -> int:
    return config.cache.nproc_per_node if stage == "cache" else config.train.nproc_per_node


def _run_torchrun(stage: str, nproc: int, args: argparse.Namespace) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command += ["-m", "deepspec.cli", stage]
    if args.config:
        command += ["--config", args.config]
    for override in args.overrides:
        command += ["--set", override]
    logger.info("%s: starting %d processes with torchrun", stage, nproc)
    env = dict(os.environ)
    # torchrun would otherwise warn and set this itself; each rank gets an equal share of the cores.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    completed = subprocess.run(command, env=env, check=False)
    if completed.returncode != 0:
        raise SystemExit(f"{stage} failed under torchrun with exit code {completed.returncode}; see the log above")


def wait_for_stage(config: PipelineConfig, stage: str, timeout: float, interval: float) -> int:
    output = stage_output(config, stage)
    deadline = time.monotonic() + timeout if timeout > 0 else None
    logger.info("waiting for %s", output / MANIFEST_NAME)
    while read_manifest(output) is None:
        if deadline is None:
            time.sleep(interval)
            continue
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            logger.error("timed out after %.0f s waiting for %s", timeout, output / MANIFEST_NAME)
            return 1
        time.sleep(min(interval, remaining))
    logger.info("%s is done", stage)
    return 0


def format_status(config: PipelineConfig) -> str:
    lines = [f"{'stage':<8} {'state':<8} output"]
    for stage in STAGES:
        output = stage_output(config, stage)
        if read_manifest(output) is not None:
            state = "done"
        elif output.exists():
            # Started but unpublished: still running, or failed or killed (the next run resumes it).
            state = "started"
        else:
            state = "waiting"
        lines.append(f"{stage:<8} {state:<8} {output}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
