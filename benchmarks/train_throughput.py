"""Benchmark draft training: tokens/s of DSpark forward + loss + backward + AdamW, fp32 against bf16 autocast.

Runs the same random batches through a DSpark draft built on a randomly
initialised Qwen3 target of the toy shape (weights do not change the cost), once
per precision, in one process. Prints one JSON object; compare the ratio, not
the absolute numbers, which depend on the machine and its load.

    python benchmarks/train_throughput.py --steps 30 --batch 4 --seq-len 160
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from deepspec.drafts.dspark import build_draft
from deepspec.drafts.losses import dspark_loss
from deepspec.runtime import configure_runtime


def toy_shaped_target() -> Qwen3ForCausalLM:
    config = Qwen3Config(
        vocab_size=4096,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        tie_word_embeddings=True,
    )
    return Qwen3ForCausalLM(config).eval()


def random_batch(batch: int, seq_len: int, hidden: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    loss_mask = torch.zeros(batch, seq_len, dtype=torch.uint8)
    loss_mask[:, seq_len // 3 :] = 1
    return {
        "input_ids": torch.randint(4, 4096, (batch, seq_len), generator=generator),
        "loss_mask": loss_mask,
        "target_hidden_states": torch.randn(batch, seq_len, 2 * hidden, generator=generator),
        "target_last_hidden_states": torch.randn(batch, seq_len, hidden, generator=generator),
    }


def measure(precision: str, steps: int, batch: int, seq_len: int) -> dict[str, float]:
    torch.manual_seed(0)
    target = toy_shaped_target()
    draft = build_draft(
        target,
        layer_ids=[1, 2],
        block_size=4,
        num_layers=2,
        num_anchors=64,
        markov_rank=32,
        markov_head_type="vanilla",
        enable_confidence_head=True,
        confidence_head_with_markov=True,
        mask_token_id=3,
        seed=0,
    ).train()
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    batches = [random_batch(batch, seq_len, 128, generator) for _ in range(4)]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    timings = []
    for step in range(steps + 3):
        started = time.perf_counter()
        with autocast:
            output = draft.forward_train(**batches[step % len(batches)], generator=generator)
        loss = dspark_loss(output, ce_alpha=0.1, l1_alpha=0.9, confidence_alpha=1.0, loss_decay_gamma=4.0).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 3:  # the first steps warm up allocator and kernels
            timings.append(time.perf_counter() - started)
    seconds = sum(timings)
    return {"tokens_per_s": steps * batch * seq_len / seconds, "step_ms": 1000 * seconds / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=160)
    args = parser.parse_args()
    configure_runtime()
    results = {precision: measure(precision, args.steps, args.batch, args.seq_len) for precision in ("fp32", "bf16")}
    results["bf16_over_fp32"] = results["bf16"]["tokens_per_s"] / results["fp32"]["tokens_per_s"]
    results["settings"] = {**vars(args), "threads": torch.get_num_threads()}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
