"""The ``eval`` stage: speculative decoding of held-out prompts with the trained draft.

Usage::

    deepspec eval --config configs/demo.yaml
    python -m deepspec.eval.stage --config configs/demo.yaml

Inputs: ``heldout.jsonl`` of the prompts stage and ``draft/`` of the train
stage, or instead of the latter the draft checkpoint directory named by
``eval.draft`` (``deepspec eval --draft DIR``), whose settings come from its
own ``config.json``. The report names the evaluated draft. Output, under
``<storage.root>/eval/<fingerprint>/``:

- ``report.json``: every metric per draft, temperature and benchmark;
- ``report.md``: the tau table and the per-position acceptance table;
- ``samples.jsonl``: one line per decoded prompt (tokens, rounds, text);
- ``rejects.jsonl``: held-out records that could not be evaluated, with the reason;
- ``config.yaml`` and ``_MANIFEST.json`` (last).

Each benchmark is a prompt source with held-out records. Only the first user
turn of a record is decoded, alone and without a system prompt, and at most
``eval.max_prompts_per_benchmark`` records per benchmark are used: the first
ones in id order. Prompt ``i`` of a benchmark is decoded with the seed
``eval.seed + i``, for every draft and temperature, so results do not depend
on the order of the work. With ``eval.compare_untrained`` a freshly
initialised draft of the same shape runs on the same prompts as a baseline.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from deepspec.config import ConfigError, PipelineConfig, load_config
from deepspec.data.chat import render_prompt_ids
from deepspec.data.stage import read_records
from deepspec.drafts.checkpoint import check_draft_matches_target, external_draft_identity, load_draft
from deepspec.drafts.dspark import build_draft
from deepspec.drafts.dspark_drafter import DSparkDrafter
from deepspec.drafts.eagle3 import build_eagle3_draft, is_eagle3
from deepspec.drafts.eagle3_drafter import Eagle3Drafter
from deepspec.eval.metrics import AcceptanceSums
from deepspec.eval.report import build_report, render_markdown, temperature_key
from deepspec.eval.speculative import GenerationResult, speculative_generate
from deepspec.logs import Progress, setup_logging
from deepspec.manifest import (
    RejectLog,
    StageError,
    StageInputError,
    atomic_write_json,
    atomic_write_text,
    file_entries,
    read_manifest,
    require_upstream,
    write_manifest,
    write_resolved_config,
)
from deepspec.pipeline import stage_fingerprints, stage_inputs, stage_output, stage_settings, upstream_stages
from deepspec.runtime import configure_runtime
from deepspec.targets.loading import end_token_ids, load_target, load_tokenizer

logger = logging.getLogger(__name__)

STAGE = "eval"
TRAINED = "trained"
UNTRAINED = "untrained"


@dataclass(frozen=True)
class EvalPrompt:
    """One held-out prompt to decode; ``index`` is its place in its benchmark and seeds its sampling."""

    benchmark: str
    record_id: str
    index: int
    prompt_ids: list[int]


def first_user_turn(record: dict[str, Any]) -> str | None:
    for message in record.get("messages") or []:
        if message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) and content.strip() else None
    return None


def resolve_benchmarks(config: PipelineConfig, records: Iterable[dict[str, Any]]) -> list[str]:
    """Return ``eval.benchmarks``, else every configured source that has held-out records, in config order."""
    present = {record.get("source") for record in records}
    if config.eval.benchmarks is not None:
        missing = [name for name in config.eval.benchmarks if name not in present]
        if missing:
            raise StageInputError(
                f"eval.benchmarks names {missing} have no held-out records in the prompts output; "
                "remove them from eval.benchmarks or raise data.heldout_fraction"
            )
        return list(config.eval.benchmarks)
    names = [source.name for source in config.data.sources if source.name in present]
    if not names:
        raise StageInputError("the prompts output has no held-out records; raise data.heldout_fraction")
    return names


def select_records(
    records: Iterable[dict[str, Any]], benchmarks: list[str], max_per_benchmark: int
) -> dict[str, list[dict[str, Any]]]:
    """Pick the first ``max_per_benchmark`` records of each benchmark in id order."""
    chosen: dict[str, list[dict[str, Any]]] = {name: [] for name in benchmarks}
    for record in records:
        if record.get("source") in chosen:
            chosen[record["source"]].append(record)
    return {name: sorted(rows, key=lambda row: row["id"])[:max_per_benchmark] for name, rows in chosen.items()}


def build_prompts(
    selected: dict[str, list[dict[str, Any]]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_positions: int,
    reserved_positions: int,
    rejects: RejectLog,
    enable_thinking: bool = False,
) -> list[EvalPrompt]:
    """Render each record's first user turn; records with no usable turn or too long a prompt are rejected."""
    prompts: list[EvalPrompt] = []
    for benchmark, records in selected.items():
        index = 0
        for record in records:
            text = first_user_turn(record)
            if text is None:
                rejects.add("no_user_turn", record_id=record.get("id"), detail="no non-empty user message")
                continue
            # Rendered as regen rendered the training prompts, so the draft gets the same prompt format.
            prompt_ids = render_prompt_ids(
                tokenizer, [{"role": "user", "content": text}], enable_thinking=enable_thinking
            )
            if len(prompt_ids) + reserved_positions > max_positions:
                rejects.add(
                    "too_long",
                    record_id=record["id"],
                    detail=(
                        f"{len(prompt_ids)} prompt tokens + {reserved_positions} for generation exceed the target's "
                        f"{max_positions} positions"
                    ),
                )
                continue
            prompts.append(EvalPrompt(benchmark, record["id"], index, prompt_ids))
            index += 1
    return prompts


def check_draft(draft: PreTrainedModel, target: PreTrainedModel, source: str) -> list[int]:
    """Check that ``draft`` fits ``target`` (vocabulary, hidden size, layer ids) and return its target layer ids.

    The target's last layer is never a valid id, because its hidden state as
    seen during decoding is final-normed.
    """
    try:
        check_draft_matches_target(draft.config, target.config)
    except ValueError as error:
        raise StageInputError(f"{source}: {error}") from error
    return list(draft.config.target_layer_ids)


def resolve_draft_dir(config: PipelineConfig) -> Path:
    """Return ``eval.draft`` when set, else the train stage's ``draft/`` directory."""
    if config.eval.draft is not None:
        draft_dir = Path(config.eval.draft).expanduser()
        if not (draft_dir / "config.json").is_file():
            raise StageInputError(
                f"eval.draft={config.eval.draft!r} has no config.json; point it at a draft checkpoint directory "
                "(config.json plus model.safetensors or model.safetensors.index.json)"
            )
        return draft_dir
    draft_dir = stage_output(config, "train") / "draft"
    if not (draft_dir / "config.json").is_file():
        raise StageInputError(f"the train output has no draft at {draft_dir}; run `deepspec train` again")
    return draft_dir


def describe_draft(config: PipelineConfig, draft_dir: Path) -> dict[str, str]:
    """Return where the evaluated draft comes from, its path, architecture and content hash."""
    identity = external_draft_identity(draft_dir)
    source = "eval.draft" if config.eval.draft is not None else "train stage"
    return {"source": source, "path": str(draft_dir.resolve()), **identity}


def draft_heading(report: dict[str, Any]) -> str:
    """Return the Markdown line that names the evaluated draft, or nothing for a report without one."""
    draft = report.get("draft")
    if not draft:
        return ""
    return (
        f"Draft `{draft['path']}` ({draft['architecture']}, from the {draft['source']}, "
        f"sha256 {draft['sha256'][:16]})\n\n"
    )


def build_untrained(trained: PreTrainedModel, target: PreTrainedModel, seed: int) -> PreTrainedModel:
    """Build a freshly initialised draft with the trained draft's settings."""
    settings = trained.config
    parameter = next(trained.parameters())
    if is_eagle3(trained):
        eagle3 = build_eagle3_draft(
            target,
            layer_ids=list(settings.target_layer_ids),
            num_layers=settings.num_hidden_layers,
            ttt_length=settings.ttt_length,
            step_loss_decay=settings.step_loss_decay,
            seed=seed,
        )
        return eagle3.to(device=parameter.device, dtype=parameter.dtype).eval()
    draft = build_draft(
        target,
        layer_ids=list(settings.target_layer_ids),
        block_size=settings.block_size,
        num_layers=settings.num_hidden_layers,
        num_anchors=settings.num_anchors,
        markov_rank=settings.markov_rank,
        markov_head_type=settings.markov_head_type,
        enable_confidence_head=settings.enable_confidence_head,
        confidence_head_with_markov=settings.confidence_head_with_markov,
        mask_token_id=settings.mask_token_id,
        seed=seed,
    )
    return draft.to(device=parameter.device, dtype=parameter.dtype).eval()


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _sample_line(
    draft: str, temperature: float, prompt: EvalPrompt, result: GenerationResult, tokenizer: PreTrainedTokenizerBase
) -> str:
    committed = sum(record.committed for record in result.rounds)
    row = {
        "draft": draft,
        "temperature": temperature,
        "benchmark": prompt.benchmark,
        "id": prompt.record_id,
        "prompt_tokens": result.prompt_length,
        "generated_tokens": len(result.tokens),
        "rounds": len(result.rounds),
        "tau": committed / len(result.rounds) if result.rounds else None,
        "finish_reason": result.finish_reason,
        "text": tokenizer.decode(result.tokens, skip_special_tokens=False),
    }
    if any(record.confidence_logits is not None for record in result.rounds):
        # Per round: drafts proposed, drafts accepted, and the confidence head's logit for each proposed slot.
        row["confidence_rounds"] = [
            {"proposed": record.proposal_length, "accepted": record.accepted, "logits": record.confidence_logits}
            for record in result.rounds
        ]
    return json.dumps(row, ensure_ascii=False)


def run_eval(config: PipelineConfig) -> Path:
    output = stage_output(config, STAGE)
    if read_manifest(output) is not None:
        logger.info("up to date: %s", output)
        return output
    fingerprints = stage_fingerprints(config)
    for upstream in upstream_stages(config, STAGE):
        require_upstream(config.storage.root, upstream, fingerprints[upstream], stage_settings(config, upstream))
    draft_dir = resolve_draft_dir(config)
    draft_info = describe_draft(config, draft_dir)
    logger.info(
        "evaluating the %s draft %s (%s, sha256 %s)",
        draft_info["source"],
        draft_dir,
        draft_info["architecture"],
        draft_info["sha256"][:16],
    )
    heldout = read_records(stage_output(config, "prompts") / "heldout.jsonl")
    benchmarks = resolve_benchmarks(config, heldout)
    selected = select_records(heldout, benchmarks, config.eval.max_prompts_per_benchmark)

    output.mkdir(parents=True, exist_ok=True)
    write_resolved_config(output, config)
    started = time.monotonic()
    device = _device()
    tokenizer = load_tokenizer(config)
    target = load_target(config, device=device)
    end_tokens = end_token_ids(target, tokenizer)
    # The draft runs in the target's dtype because it consumes the target's hidden states directly.
    drafts: dict[str, PreTrainedModel] = {TRAINED: load_draft(draft_dir, device=device, dtype=target.dtype)}
    layer_ids = check_draft(drafts[TRAINED], target, f"draft {draft_dir}")
    if config.eval.compare_untrained:
        drafts[UNTRAINED] = build_untrained(drafts[TRAINED], target, config.eval.seed)
        check_draft(drafts[UNTRAINED], target, "untrained draft")
    # An Eagle3 draft proposes up to ttt_length tokens per round.
    trained_config = drafts[TRAINED].config
    block_size = int(trained_config.ttt_length if is_eagle3(drafts[TRAINED]) else trained_config.block_size)

    with RejectLog(output / "rejects.jsonl") as rejects:
        prompts = build_prompts(
            selected,
            tokenizer,
            max_positions=int(target.config.max_position_embeddings),
            reserved_positions=config.eval.max_new_tokens + block_size + 1,
            rejects=rejects,
            enable_thinking=bool(config.regen.enable_thinking),
        )
    if not prompts:
        raise StageError(
            f"eval: none of the {sum(len(rows) for rows in selected.values())} selected held-out records can be "
            f"decoded (rejected by reason: {dict(rejects.counts)}); see {output / 'rejects.jsonl'}"
        )
    logger.info(
        "evaluating %d prompts from %s with drafts %s at temperatures %s",
        len(prompts),
        ", ".join(f"{name}={sum(p.benchmark == name for p in prompts)}" for name in benchmarks),
        ", ".join(drafts),
        config.eval.temperatures,
    )

    results: dict[str, dict[float, dict[str, AcceptanceSums]]] = {name: {} for name in drafts}
    samples: list[str] = []
    progress = Progress(logger, "prompts", len(prompts) * len(drafts) * len(config.eval.temperatures))
    for temperature in config.eval.temperatures:
        for name, model in drafts.items():
            drafter = Eagle3Drafter(model, end_token_ids=end_tokens) if is_eagle3(model) else DSparkDrafter(model)
            per_benchmark = results[name].setdefault(float(temperature), {})
            for prompt in prompts:
                generator = torch.Generator(device=device).manual_seed(config.eval.seed + prompt.index)
                result = speculative_generate(
                    target,
                    drafter,
                    prompt.prompt_ids,
                    layer_ids=layer_ids,
                    max_new_tokens=config.eval.max_new_tokens,
                    temperature=float(temperature),
                    end_token_ids=end_tokens,
                    generator=generator,
                )
                sums = per_benchmark.setdefault(prompt.benchmark, AcceptanceSums())
                sums.add_result(result)
                samples.append(_sample_line(name, float(temperature), prompt, result, tokenizer))
                tau = sums.tau
                progress.update(
                    note=f"{name} T={temperature_key(temperature)} {prompt.benchmark} "
                    f"tau={'-' if tau is None else f'{tau:.2f}'}"
                )
    progress.finish()
    metadata = {
        "target": config.target.name_or_path,
        "draft_dir": str(draft_dir),
        "draft": draft_info,
        "block_size": block_size,
        "target_layer_ids": layer_ids,
        "max_new_tokens": config.eval.max_new_tokens,
        "seed": config.eval.seed,
        "device": str(device),
    }
    return _finalize(config, output, results, samples, prompts, rejects, time.monotonic() - started, metadata)


def _finalize(
    config: PipelineConfig,
    output: Path,
    results: dict[str, dict[float, dict[str, AcceptanceSums]]],
    samples: list[str],
    prompts: list[EvalPrompt],
    rejects: RejectLog,
    seconds: float,
    metadata: dict[str, Any],
) -> Path:
    report = build_report(results, metadata)
    markdown = draft_heading(report) + render_markdown(report)
    atomic_write_text(output / "samples.jsonl", "".join(line + "\n" for line in samples))
    atomic_write_json(output / "report.json", report)
    atomic_write_text(output / "report.md", markdown)
    generated = sum(
        sums.generated_tokens for per_t in results.values() for per_b in per_t.values() for sums in per_b.values()
    )
    rounds = sum(sums.rounds for per_t in results.values() for per_b in per_t.values() for sums in per_b.values())
    write_manifest(
        output,
        stage=STAGE,
        stage_fingerprint=stage_fingerprints(config)[STAGE],
        settings=stage_settings(config, STAGE),
        inputs=stage_inputs(config, STAGE),
        counts={
            "prompts": len(prompts),
            "rejected": rejects.total,
            "decoded": len(samples),
            "rounds": rounds,
            "generated_tokens": generated,
        },
        rejected=dict(rejects.counts),
        files=file_entries(output, ["report.json", "report.md", "samples.jsonl", "rejects.jsonl"]),
        timings={"total": seconds},
        extra={"mean_tau": report["mean_tau"]},
    )
    logger.info("report written to %s\n%s", output / "report.md", markdown)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Evaluate the trained draft by speculative decoding.")
    parser.add_argument("--config", help="pipeline YAML file (default: $DEEPSPEC_CONFIG)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, typed by the schema, e.g. --set eval.max_new_tokens=32 (repeatable)",
    )
    parser.add_argument(
        "--draft", metavar="DIR", help="evaluate this draft checkpoint directory; the same as --set eval.draft=DIR"
    )
    args = parser.parse_args(argv)
    configure_runtime()
    setup_logging(STAGE)
    try:
        overrides = [*args.overrides, *([f"eval.draft={args.draft}"] if args.draft else [])]
        config = load_config(args.config, overrides)
        run_eval(config)
    except (ConfigError, StageInputError) as error:
        logger.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
