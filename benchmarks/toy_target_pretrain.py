"""Compare fp32 and bf16-autocast pretraining throughput of the toy target on this CPU.

Usage::

    python benchmarks/toy_target_pretrain.py [--steps 12] [--warmup-steps 3] [--data-dir DIR]

Both precisions train a fresh model with the same seed and the same batches,
in one process, so ``bf16_speedup`` compares them under the same conditions.
Absolute tokens/s depend on the CPU, its load and ``DEEPSPEC_NUM_THREADS``.
With ``--data-dir`` (default ``$DEEPSPEC_DATA_DIR``) the batches are the packed
benchmark prompts. Without it they are uniform random token ids, which cost the
same per step. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from deepspec.runtime import configure_runtime

configure_runtime()

import torch  # noqa: E402

from deepspec.config import ToyTargetConfig  # noqa: E402
from deepspec.targets.toy import (  # noqa: E402
    build_model,
    encode_conversations,
    packed_batches,
    pretrain,
    read_corpus_rows,
    split_corpus,
    tokenizer_texts,
    train_tokenizer,
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="timed optimizer steps per precision")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps before the timed ones")
    parser.add_argument("--data-dir", default=os.environ.get("DEEPSPEC_DATA_DIR"), help="folder of *.jsonl prompts")
    return parser.parse_args(argv)


def fixed_batches(cfg: ToyTargetConfig, count: int, data_dir: str | None) -> tuple[list[torch.Tensor], str]:
    """Return ``count`` batches to replay for each precision, and a label of their source."""
    if data_dir:
        files = sorted(Path(data_dir).glob("*.jsonl"), key=lambda path: path.name)
        corpus = split_corpus(read_corpus_rows(files), cfg)
        tokenizer = train_tokenizer(tokenizer_texts(corpus.train), cfg.vocab_size, cfg.max_position_embeddings)
        documents = encode_conversations(tokenizer, corpus.train)
        source: Iterator[torch.Tensor] = packed_batches(documents, cfg.seq_len, cfg.batch_size, cfg.seed)
        return list(itertools.islice(source, count)), f"corpus:{data_dir}"
    generator = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.batch_size, cfg.seq_len)
    return [torch.randint(4, cfg.vocab_size, shape, generator=generator) for _ in range(count)], "random-token-ids"


def measure(cfg: ToyTargetConfig, batches: list[torch.Tensor], warmup_steps: int) -> dict[str, float]:
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    pretrain(model, iter(batches[:warmup_steps]), cfg, steps=warmup_steps)
    timed = batches[warmup_steps:]
    stats = pretrain(model, iter(timed), cfg, steps=len(timed))
    return {"tokens_per_second": round(stats.tokens_per_second, 1), "final_loss": round(stats.final_loss, 4)}


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    base = ToyTargetConfig()
    batches, source = fixed_batches(base, args.warmup_steps + args.steps, args.data_dir)
    fp32 = measure(base.model_copy(update={"bf16_autocast": False}), batches, args.warmup_steps)
    bf16 = measure(base.model_copy(update={"bf16_autocast": True}), batches, args.warmup_steps)
    result = {
        "benchmark": "toy_target_pretrain",
        "data": source,
        "batch_tokens": base.batch_size * base.seq_len,
        "timed_steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "fp32_tokens_per_second": fp32["tokens_per_second"],
        "bf16_tokens_per_second": bf16["tokens_per_second"],
        "bf16_speedup": round(bf16["tokens_per_second"] / fp32["tokens_per_second"], 3),
        "fp32_final_loss": fp32["final_loss"],
        "bf16_final_loss": bf16["final_loss"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
