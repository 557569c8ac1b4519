"""The ``deepspec`` command: one subcommand per stage, plus run, wait, status, compare, serve-target and toy-target.

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
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from deepspec.config import ConfigError, PipelineConfig, load_config
from deepspec.heartbeat import Heartbeat, is_fresh
from deepspec.logs import set_stage, setup_logging
from deepspec.manifest import MANIFEST_NAME, StageError, StageInputError
from deepspec.pipeline import STAGES, stage_fingerprints, upstream_stages
from deepspec.runtime import configure_runtime
from deepspec.storage import StageSync, Storage, localize, open_storage

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


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port from 1 to 65535, got {text!r}")
    return int(text)


def _non_negative(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive(text: str) -> float:
    value = _number(text)
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
    regen = add("regen", "regenerate assistant answers with the target")
    regen.add_argument("--finalize", action="store_true", help="only merge the finished shards into the output")
    regen.add_argument("--shard-index", type=int, help="this process's shard (default: $JOB_COMPLETION_INDEX, else 0)")
    regen.add_argument("--num-shards", type=int, help="how many shards the train records are split into (default 1)")
    serve = add("serve-target", "print (or with --launch, run) the vLLM or SGLang command that serves the target")
    serve.add_argument("--engine", choices=("vllm", "sglang"), default="vllm")
    serve.add_argument("--launch", action="store_true", help="replace this process with the server")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for other pods)")
    serve.add_argument("--port", type=_port, default=8000)
    serve.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs one server spans")
    serve.add_argument("--max-model-len", type=int, help="context length the server allocates for")
    serve.add_argument(
        "--script",
        metavar="FILE",
        help="also write the command as a shell script, for a server container whose image has no deepspec",
    )
    cache = add("cache", "capture target hidden states into the cache (run under torchrun for several ranks)")
    cache.add_argument("--finalize", action="store_true", help="only merge finished units into the final cache")
    add("train", "train the draft on the cache (run under torchrun for DDP)")
    evaluate = add("eval", "speculative decoding on held-out prompts; report accepted length per benchmark")
    evaluate.add_argument(
        "--draft",
        metavar="DIR",
        help="evaluate this draft checkpoint directory (config.json + safetensors) instead of the train stage's "
        "draft; the same as --set eval.draft=DIR",
    )
    run = add("run", "run every stage in order, skipping stages whose output is current")
    run.add_argument("--until", choices=STAGES, help="stop after this stage")
    wait = add("wait", "block until a stage's output for this config exists")
    wait.add_argument("stage", choices=STAGES)
    wait.add_argument("--timeout", type=_non_negative, default=0, help="seconds to wait; 0 waits forever")
    wait.add_argument("--interval", type=_positive, default=10, help="seconds between checks")
    add("status", "show which stages are done, running or waiting for this config")
    compare = commands.add_parser(
        "compare",
        help="print the tau of several finished configs side by side",
        description="print the tau of several finished configs side by side: a row per draft, a column per benchmark",
    )
    compare.add_argument("configs", nargs="+", metavar="CONFIG", help="pipeline YAML files whose eval stage is done")
    compare.add_argument(
        "--which", default="trained", choices=("trained", "untrained"), help="compare the trained or untrained drafts"
    )
    add("toy-target", "build (or find in the cache) the toy target and print its directory and metrics")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_runtime()
    setup_logging(args.command)
    try:
        if args.command == "compare":
            from deepspec.eval.compare import load_rows, render_comparison

            print(render_comparison(load_rows(args.configs), args.which))
            return 0
        overrides = list(args.overrides)
        if getattr(args, "draft", None):
            overrides.append(f"eval.draft={args.draft}")
        config = load_config(args.config, overrides)
        storage = open_storage(config)
        return _dispatch(args, config, storage)
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
    except Exception as error:
        from_s3_client = type(error).__module__.startswith(("botocore", "boto3", "s3transfer"))
        if not from_s3_client or os.environ.get("DEEPSPEC_DEBUG"):
            raise
        logger.error(
            "S3 request failed: %s: %s. Check the bucket in storage.root, the AWS_* credentials and "
            "AWS_ENDPOINT_URL (DEEPSPEC_DEBUG=1 shows the traceback)",
            type(error).__name__,
            error,
        )
        return 2
    except KeyboardInterrupt:
        logger.error("interrupted; run the same command again to resume")
        return 130


def _dispatch(args: argparse.Namespace, config: PipelineConfig, storage: Storage) -> int:
    command = args.command
    if command == "cache" and args.finalize:
        from deepspec.cache.stage import finalize_cache

        with stage_session(config, storage, "cache"):
            finalize_cache(localize(config, storage))
        return 0
    if command == "regen" and (args.finalize or args.shard_index is not None or args.num_shards is not None):
        return _regen_sharded(args, config, storage)
    if command == "serve-target":
        return _serve_target(args, config)
    if command in STAGES:
        run_stage(config, storage, command)
        return 0
    if command == "run":
        return run_pipeline(config, args, storage, until=args.until)
    if command == "wait":
        return wait_for_stage(config, storage, args.stage, args.timeout, args.interval)
    if command == "status":
        print(format_status(config, storage))
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


def _regen_sharded(args: argparse.Namespace, config: PipelineConfig, storage: Storage) -> int:
    from deepspec.regen.shards import ShardSpec
    from deepspec.regen.stage import finalize_regen, run_regen

    with stage_session(config, storage, "regen"):
        if args.finalize:
            finalize_regen(localize(config, storage))
        else:
            run_regen(localize(config, storage), ShardSpec.resolve(args.shard_index, args.num_shards))
    return 0


def _serve_target(args: argparse.Namespace, config: PipelineConfig) -> int:
    from deepspec.regen.serve import ServeOptions, format_command, launch, serve_command, write_script
    from deepspec.targets.loading import resolve_target

    options = ServeOptions(args.engine, args.host, args.port, args.tensor_parallel_size, args.max_model_len)
    command = serve_command(config, resolve_target(config), options)
    print(format_command(command), flush=True)
    if args.script:
        write_script(args.script, command)
    if args.launch:
        launch(command)
    return 0


def stage_sync(config: PipelineConfig, storage: Storage, stage: str) -> StageSync:
    """Mirror an S3-backed stage's inputs and publish its output; a no-op for local roots."""
    publisher = os.environ.get("RANK", "0") in ("", "0")
    if storage.is_remote and stage == "cache":
        world, local_world = os.environ.get("WORLD_SIZE", "1"), os.environ.get("LOCAL_WORLD_SIZE")
        if local_world is not None and world != local_world:
            raise ConfigError(
                f"storage.root={config.storage.root!r} is on S3 but the cache stage spans several nodes "
                f"(WORLD_SIZE={world}, LOCAL_WORLD_SIZE={local_world}); build the cache on one node, or use a "
                "shared ReadWriteMany volume as storage.root"
            )
    return StageSync(
        storage,
        stage,
        stage_fingerprints(config),
        upstream_stages(config, stage),
        interval_s=config.storage.sync_interval_s,
        publisher=publisher,
    )


def needed_stages(config: PipelineConfig) -> list[str]:
    """Return the stages eval depends on, and eval, in pipeline order (with ``eval.draft`` only prompts and eval)."""
    needed = {"eval"}
    pending = ["eval"]
    while pending:
        for upstream in upstream_stages(config, pending.pop()):
            if upstream not in needed:
                needed.add(upstream)
                pending.append(upstream)
    return [stage for stage in STAGES if stage in needed]


def run_stage(config: PipelineConfig, storage: Storage, stage: str) -> None:
    """Run one stage in this process, through the S3 mirror when the root is remote."""
    stage_fingerprint = stage_fingerprints(config)[stage]
    if storage.is_remote and storage.has_manifest(stage, stage_fingerprint):
        logger.info("%s: up to date (%s)", stage, storage.uri(stage, stage_fingerprint))
        return
    with stage_session(config, storage, stage):
        _stage_runner(stage)(localize(config, storage))


@contextlib.contextmanager
def stage_session(config: PipelineConfig, storage: Storage, stage: str) -> Iterator[None]:
    """Mirror the stage's files (S3 roots) and keep its heartbeat fresh while it runs (on rank 0)."""
    sync = stage_sync(config, storage, stage)
    with sync, Heartbeat(storage.local_dir(stage, stage_fingerprints(config)[stage]), enabled=sync.publisher):
        yield


def run_pipeline(config: PipelineConfig, args: argparse.Namespace, storage: Storage, until: str | None = None) -> int:
    """Run the stages in order; a stage whose manifest exists is skipped."""
    fingerprints = stage_fingerprints(config)
    if "cache" in needed_stages(config) and not storage.has_manifest("cache", fingerprints["cache"]):
        check_layer_ids_early(config)
    timings: dict[str, float] = {}
    skipped: set[str] = set()
    for stage in needed_stages(config):
        started = time.monotonic()
        set_stage(stage)
        if storage.has_manifest(stage, fingerprints[stage]):
            logger.info("%s: up to date (%s)", stage, storage.uri(stage, fingerprints[stage]))
            skipped.add(stage)
        elif stage in DISTRIBUTED_STAGES and _nproc(config, stage) > 1:
            _run_torchrun(stage, _nproc(config, stage), args)
        else:
            logger.info("%s: running", stage)
            run_stage(config, storage, stage)
        timings[stage] = time.monotonic() - started
        if stage == until:
            break
    set_stage("run")
    logger.info("stage wall times (s): %s", json.dumps({k: round(v, 1) for k, v in timings.items()}))
    # A fresh eval logs its report itself; an up-to-date one is shown here.
    if "eval" in skipped:
        storage.pull("eval", fingerprints["eval"])
    report = storage.local_dir("eval", fingerprints["eval"]) / "report.md"
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


def wait_for_stage(config: PipelineConfig, storage: Storage, stage: str, timeout: float, interval: float) -> int:
    stage_fingerprint = stage_fingerprints(config)[stage]
    where = f"{storage.uri(stage, stage_fingerprint)}/{MANIFEST_NAME}"
    deadline = time.monotonic() + timeout if timeout > 0 else None
    logger.info("waiting for %s", where)
    while not storage.has_manifest(stage, stage_fingerprint):
        if deadline is None:
            time.sleep(interval)
            continue
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            logger.error("timed out after %.0f s waiting for %s", timeout, where)
            return 1
        time.sleep(min(interval, remaining))
    logger.info("%s is done", stage)
    return 0


def format_status(config: PipelineConfig, storage: Storage) -> str:
    lines = [f"{'stage':<8} {'state':<8} output"]
    fingerprints = stage_fingerprints(config)
    # On S3 the heartbeat reaches the bucket with the periodic upload, so it may be that much older.
    slack = config.storage.sync_interval_s if storage.is_remote else 0.0
    for stage in STAGES:
        output = storage.uri(stage, fingerprints[stage])
        if storage.has_manifest(stage, fingerprints[stage]):
            state = "done"
        elif is_fresh(storage.heartbeat_age(stage, fingerprints[stage]), slack_s=slack):
            state = "running"
        elif storage.has_anything(stage, fingerprints[stage]):
            # Started, unpublished and no recent heartbeat: the run failed or was killed; the next run resumes it.
            state = "stopped"
        else:
            state = "waiting"
        lines.append(f"{stage:<8} {state:<8} {output}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
