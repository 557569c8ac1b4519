"""The training loop: one call per phase, DDP over the target cache."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from deepspec.cache.reader import CacheReader, collate
from deepspec.config import ConfigError, PipelineConfig
from deepspec.drafts.eagle3 import is_eagle3
from deepspec.drafts.eagle3_loss import eagle3_loss, eagle3_loss_kwargs
from deepspec.drafts.losses import dspark_loss, loss_kwargs_from_config
from deepspec.logs import format_duration
from deepspec.manifest import StageError
from deepspec.train.checkpoint import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from deepspec.train.data import StepSampler
from deepspec.train.distributed import DistEnv, all_reduce_sum
from deepspec.train.optim import build_optimizer, set_lr

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_SKIPS = 10
# Loss numerators and denominators stay out of the step log; the ratios are logged instead.
COUNTER_SUFFIXES = ("_num", "_den", "_den_global")


class _TrainForward(torch.nn.Module):
    """Routes DDP's ``forward`` to the draft's training forward, so DDP's gradient hooks engage."""

    def __init__(self, draft: torch.nn.Module) -> None:
        super().__init__()
        self.draft = draft

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> Any:
        if is_eagle3(self.draft):
            return self.draft.forward_train(
                input_ids=batch["input_ids"],
                target_hidden_states=batch["target_hidden"],
                loss_mask=batch["loss_mask"],
                attention_mask=batch["attention_mask"],
                target_last_hidden_states=batch["target_last_hidden"],
            )
        return self.draft.forward_train(
            input_ids=batch["input_ids"],
            target_hidden_states=batch["target_hidden"],
            loss_mask=batch["loss_mask"],
            target_last_hidden_states=batch["target_last_hidden"],
            generator=generator,
        )


@dataclass
class StepResult:
    loss: float
    components: dict[str, float]
    grad_norm: float
    lr: float
    tokens: int
    supervised: int
    seconds: float
    skipped: str | None = None


@dataclass
class TrainSummary:
    steps: int
    tokens: int
    samples: int
    seconds: float
    skipped_steps: int
    resumed_from: int
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class Trainer:
    def __init__(
        self, config: PipelineConfig, env: DistEnv, cache: CacheReader, draft: torch.nn.Module, output: Path
    ) -> None:
        settings = config.train
        per_step = env.world_size * settings.per_device_batch_size
        if settings.global_batch_size % per_step != 0:
            raise ConfigError(
                f"train.global_batch_size={settings.global_batch_size} must be a multiple of world size "
                f"({env.world_size}) x train.per_device_batch_size ({settings.per_device_batch_size}); "
                "change one of them"
            )
        self.config = config
        self.settings = settings
        self.env = env
        self.cache = cache
        self.draft = draft.to(env.device)
        self.output = output
        self.accumulation = settings.global_batch_size // per_step
        self.eagle3 = is_eagle3(draft)
        self.loss_kwargs = eagle3_loss_kwargs(config.draft) if self.eagle3 else loss_kwargs_from_config(config.draft)
        self.sampler = StepSampler(len(cache), settings.global_batch_size, settings.seed)
        trainable = [param for param in self.draft.parameters() if param.requires_grad]
        self.optimizer = build_optimizer(trainable, settings)
        self.module = _TrainForward(self.draft)
        self.ddp: torch.nn.Module = self.module
        if env.world_size > 1:
            device_ids = [env.device.index] if env.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.module, device_ids=device_ids)
        self.state = TrainState(step=0, samples_seen=0, tokens_seen=0, skipped_steps=0)
        self.checkpoints = output / "checkpoints"
        self.resumed_from = 0
        self._consecutive_skips = 0
        self._history: list[dict[str, Any]] = []

    def maybe_resume(self) -> None:
        path = latest_checkpoint(self.checkpoints)
        if path is None:
            return
        self.state = load_checkpoint(path, self.draft, self.optimizer)
        self.resumed_from = self.state.step
        logger.info("resumed from %s at step %d/%d", path, self.state.step, self.settings.max_steps)

    def train(self) -> TrainSummary:
        self.maybe_resume()
        started = time.monotonic()
        tokens_at_start = self.state.tokens_seen
        while self.state.step < self.settings.max_steps:
            result = self.train_step()

            self.maybe_log(result, started, tokens_at_start)

            self.maybe_checkpoint()
        seconds = time.monotonic() - started
        return TrainSummary(
            steps=self.state.step,
            tokens=self.state.tokens_seen - tokens_at_start,
            samples=self.state.samples_seen,
            seconds=seconds,
            skipped_steps=self.state.skipped_steps,
            resumed_from=self.resumed_from,
            history=self._history,
        )

    def train_step(self) -> StepResult:
        started = time.monotonic()
        step = self.state.step
        micro_batches = self.sampler.rank_micro_batches(
            step, self.env.rank, self.env.world_size, self.settings.per_device_batch_size
        )
        totals = {"loss": 0.0, "tokens": 0, "supervised": 0, "nonfinite": 0}
        components: dict[str, float] = {}
        self.optimizer.zero_grad(set_to_none=True)
        for index, indices in enumerate(micro_batches):
            is_last = index == len(micro_batches) - 1
            sync = nullcontext() if is_last or self.ddp is self.module else self.ddp.no_sync()
            with sync:
                result = self._forward_backward(indices, step, index)
            totals["loss"] += result["loss"] / self.accumulation
            totals["tokens"] += result["tokens"]
            totals["supervised"] += result["supervised"]
            totals["nonfinite"] += result["nonfinite"]
            for name, value in result["components"].items():
                if name.endswith(COUNTER_SUFFIXES):
                    continue
                components[name] = components.get(name, 0.0) + value / self.accumulation

        # Each rank's loss is its share of the global weighted mean, so the sum is the global loss.
        counts = torch.tensor([totals["tokens"], totals["nonfinite"], totals["loss"]], dtype=torch.float64)
        all_reduce_sum(counts)
        tokens, nonfinite, global_loss = int(counts[0]), int(counts[1]), float(counts[2])
        grad_norm = torch.nn.utils.clip_grad_norm_(self.draft.parameters(), self.settings.max_grad_norm)
        lr = set_lr(self.optimizer, step + 1, self.settings)
        skipped = self._skip_reason(totals["supervised"], nonfinite, float(grad_norm))
        if skipped is None:
            self.optimizer.step()
            self._consecutive_skips = 0
        else:
            self._register_skip(skipped)
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.samples_seen += self.settings.global_batch_size
        self.state.tokens_seen += tokens
        return StepResult(
            loss=global_loss if not nonfinite else math.nan,
            components=components,
            grad_norm=float(grad_norm),
            lr=lr,
            tokens=tokens,
            supervised=totals["supervised"],
            seconds=time.monotonic() - started,
            skipped=skipped,
        )

    def _forward_backward(self, indices: list[int], step: int, micro: int) -> dict[str, Any]:
        batch = collate([self.cache[i] for i in indices])
        batch = {name: tensor.to(self.env.device, non_blocking=True) for name, tensor in batch.items()}
        generator = torch.Generator(device=self.env.device).manual_seed(
            _seed(self.settings.seed, step, self.env.rank, micro)
        )
        autocast = (
            torch.autocast(device_type=self.env.device.type, dtype=torch.bfloat16)
            if self.settings.precision == "bf16"
            else nullcontext()
        )
        with autocast:
            output = self.ddp(batch, generator)
        if self.eagle3:
            # Each rank's Eagle3 loss is its local mean, so DDP's gradient average is the global mean.
            loss_output = eagle3_loss(output, **self.loss_kwargs)
            logged = {name: value for name, value in loss_output.metrics.items() if name != "loss"}
        else:
            loss_output = dspark_loss(
                output,
                **self.loss_kwargs,
                all_reduce=all_reduce_sum if self.env.world_size > 1 else None,
                world_size=self.env.world_size,
            )
            logged = loss_output.components
        loss = loss_output.loss
        flag = torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0])
        all_reduce_sum(flag)
        nonfinite = int(flag.item() > 0)
        if not nonfinite:
            (loss / self.accumulation).backward()
        return {
            "loss": float(loss.detach()) / self.env.world_size if not nonfinite else 0.0,
            "tokens": int(batch["attention_mask"].sum()),
            "supervised": int(loss_output.num_supervised),
            "nonfinite": nonfinite,
            "components": {name: float(value) for name, value in logged.items()},
        }

    def _skip_reason(self, supervised: int, nonfinite: int, grad_norm: float) -> str | None:
        if nonfinite:
            return "non-finite loss"
        if supervised == 0:
            return "no supervised tokens on any rank"
        if not math.isfinite(grad_norm):
            return "non-finite gradient norm"
        return None

    def _register_skip(self, reason: str) -> None:
        self.state.skipped_steps += 1
        self._consecutive_skips += 1
        logger.warning("step %d: optimizer step skipped (%s)", self.state.step + 1, reason)
        if self._consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
            raise StageError(
                f"{self._consecutive_skips} optimizer steps in a row were skipped ({reason}); "
                "check the cache for samples without supervised tokens or lower train.lr"
            )

    def maybe_log(self, result: StepResult, started: float, tokens_at_start: int) -> None:
        step = self.state.step
        record = {
            "step": step,
            "loss": result.loss,
            **result.components,
            "grad_norm": result.grad_norm,
            "lr": result.lr,
            "tokens": result.tokens,
            "step_s": result.seconds,
        }
        self._history.append(record)
        if not self.env.is_main:
            return
        with open(self.output / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if step != 1 and step % self.settings.log_every != 0 and step != self.settings.max_steps:
            return
        elapsed = time.monotonic() - started
        done = step - self.resumed_from
        rate = (self.state.tokens_seen - tokens_at_start) / max(elapsed, 1e-9)
        eta = format_duration(elapsed / max(done, 1) * (self.settings.max_steps - step))
        parts = " ".join(f"{name}={value:.4f}" for name, value in result.components.items())
        logger.info(
            "step=%d/%d loss=%.4f %s grad_norm=%.3f lr=%.2e tokens/s=%.0f step_s=%.2f eta=%s",
            step,
            self.settings.max_steps,
            result.loss,
            parts,
            result.grad_norm,
            result.lr,
            rate,
            result.seconds,
            eta,
        )

    def maybe_checkpoint(self) -> None:
        step = self.state.step
        if step % self.settings.checkpoint_every != 0 or step == self.settings.max_steps:
            return
        if self.env.is_main:
            save_checkpoint(self.checkpoints, self.draft, self.optimizer, self.state, self.settings.keep_last)


def _seed(*parts: int) -> int:
    digest = hashlib.sha256(":".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
