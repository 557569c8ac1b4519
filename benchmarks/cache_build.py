"""Benchmark the cache stage: build tokens/s and bytes/token for bfloat16 against float32, and read MB/s.

Builds the same synthetic regen output twice on a randomly initialised
Qwen3 target of the toy shape (weights do not change the cost), once per
``cache.hidden_dtype``, then reads every sample of each cache back through
``CacheReader``. Prints one JSON object; compare the ratios, not the absolute
numbers, which depend on the machine.

    python benchmarks/cache_build.py --records 512

NOTE: the read pass runs right after the build, so the shards are in the page
cache; this measures decoding speed, not disk or network throughput.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from deepspec.cache.reader import CacheReader
from deepspec.cache.stage import run_cache
from deepspec.config import PipelineConfig, validate_config
from deepspec.manifest import file_entries, read_manifest, write_manifest
from deepspec.pipeline import stage_fingerprints, stage_inputs, stage_output, stage_settings
from deepspec.runtime import configure_runtime
from deepspec.targets.toy import train_tokenizer

WORDS = (
    "the a of to and in is it that for on with as was at by this be from or an are which "
    "number sum total step answer python list return value function each two three four five "
    "please reason put final box string index loop if else while def print result"
).split()


def _text(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def synthetic_records(count: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        {
            "id": f"bench-{index:06d}",
            "source": "synthetic",
            "split": "train",
            "messages": [
                {"role": "user", "content": _text(rng, 20, 60)},
                {"role": "assistant", "content": _text(rng, 30, 150)},
            ],
        }
        for index in range(count)
    ]


def build_target(directory: Path, records: list[dict[str, Any]], args: argparse.Namespace) -> None:
    texts = [message["content"] for record in records[:200] for message in record["messages"]]
    tokenizer = train_tokenizer(texts, vocab_size=1024, model_max_length=4096)
    torch.manual_seed(0)
    model_config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=args.hidden_size // 4,
        intermediate_size=4 * args.hidden_size,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    Qwen3ForCausalLM(model_config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def make_config(root: Path, target: Path, hidden_dtype: str, args: argparse.Namespace) -> PipelineConfig:
    return validate_config(
        {
            "target": {"name_or_path": str(target)},
            "data": {"sources": [{"name": "synthetic", "path": "synthetic.jsonl"}]},
            "cache": {
                "layer_ids": list(range(0, args.num_layers - 1, 2))[:3] or [0],
                "max_length": 1024,
                "batch_size": args.batch_size,
                "hidden_dtype": hidden_dtype,
            },
            "storage": {"root": str(root)},
        }
    )


def write_regen_output(config: PipelineConfig, records: list[dict[str, Any]]) -> None:
    directory = stage_output(config, "regen")
    directory.mkdir(parents=True)
    (directory / "records.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    write_manifest(
        directory,
        stage="regen",
        stage_fingerprint=stage_fingerprints(config)["regen"],
        settings=stage_settings(config, "regen"),
        inputs=stage_inputs(config, "regen"),
        counts={"in": len(records), "out": len(records)},
        files=file_entries(directory, ["records.jsonl"]),
    )


def measure(config: PipelineConfig, records: list[dict[str, Any]]) -> dict[str, float]:
    write_regen_output(config, records)
    started = time.perf_counter()
    output = run_cache(config)
    build_s = time.perf_counter() - started
    manifest = read_manifest(output)
    assert manifest is not None
    counts = manifest["counts"]

    reader = CacheReader(output)
    started = time.perf_counter()
    for position in range(len(reader)):
        reader[position]
    read_s = time.perf_counter() - started
    info = reader.info
    return {
        "build_tokens_per_s": round(counts["tokens"] / build_s, 1),
        "bytes_per_token": info["bytes_per_token"],
        "data_mb": round(info["data_bytes"] / 1e6, 2),
        "read_mb_per_s": round(info["data_bytes"] / 1e6 / read_s, 1),
        "read_samples_per_s": round(len(reader) / read_s, 1),
        "tokens": counts["tokens"],
        "build_s": round(build_s, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=512, help="synthetic conversations to cache")
    parser.add_argument("--hidden-size", type=int, default=128, help="target hidden size")
    parser.add_argument("--num-layers", type=int, default=4, help="target decoder layers")
    parser.add_argument("--batch-size", type=int, default=16, help="cache.batch_size")
    args = parser.parse_args()
    configure_runtime()
    records = synthetic_records(args.records, seed=0)
    with tempfile.TemporaryDirectory(prefix="deepspec-cache-bench-") as scratch:
        root = Path(scratch)
        target = root / "target"
        build_target(target, records, args)
        results = {
            dtype: measure(make_config(root / dtype, target, dtype, args), records) for dtype in ("bfloat16", "float32")
        }
    bf16, fp32 = results["bfloat16"], results["float32"]
    print(
        json.dumps(
            {
                "benchmark": "cache_build",
                "records": args.records,
                "hidden_size": args.hidden_size,
                "num_layers": args.num_layers,
                "threads": torch.get_num_threads(),
                "bfloat16": bf16,
                "float32": fp32,
                "ratio_build_tokens_per_s_bf16_over_fp32": round(
                    bf16["build_tokens_per_s"] / fp32["build_tokens_per_s"], 3
                ),
                "ratio_bytes_per_token_bf16_over_fp32": round(bf16["bytes_per_token"] / fp32["bytes_per_token"], 3),
                "ratio_read_mb_per_s_bf16_over_fp32": round(bf16["read_mb_per_s"] / fp32["read_mb_per_s"], 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
