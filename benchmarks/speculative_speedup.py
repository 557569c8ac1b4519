"""Benchmark speculative decoding against plain target decoding: wall-clock tokens/s and their ratio.

Runs on a randomly initialised Qwen3 target of the toy shape (random weights
decode at the same cost as trained ones) and greedy decoding, in one process,
so the ratios compare like with like. Drafters:

- ``oracle``: proposes the target's own greedy continuation at no cost, so
  every draft is accepted; this is the loop's ceiling (tau = block size + 1).
- ``dspark_untrained``: a freshly initialised DSpark draft; nearly every draft
  is rejected, so this is the floor: the draft's cost with no gain.
- ``dspark_cost_oracle_tokens``: runs the DSpark draft for its cost but
  proposes the oracle's tokens, i.e. a perfectly trained draft of this size.

Plain decoding is a KV-cached greedy loop over the same target, one token per
forward; ``hf_generate`` is Hugging Face ``generate`` for reference. Prints
one JSON object; compare the ratios, not the absolute numbers.

    python benchmarks/speculative_speedup.py --prompts 8 --max-new-tokens 64 --block-size 4
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM

from deepspec.config import ToyTargetConfig
from deepspec.drafts.base import Drafter, Proposal
from deepspec.drafts.dspark import build_draft
from deepspec.drafts.dspark_drafter import DSparkDrafter
from deepspec.eval.metrics import AcceptanceSums
from deepspec.eval.speculative import speculative_generate
from deepspec.runtime import configure_runtime

LAYER_IDS = [1, 2]


def build_target(seed: int) -> Qwen3ForCausalLM:
    shape = ToyTargetConfig()
    config = Qwen3Config(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).eval()


@torch.inference_mode()
def plain_greedy(target: Qwen3ForCausalLM, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Decode greedily with a KV cache, one target forward per token."""
    cache = DynamicCache(config=target.config)
    logits = target(input_ids=torch.tensor([prompt]), cache=cache, use_cache=True, logits_to_keep=1).logits
    tokens = [int(logits[0, -1].argmax())]
    while len(tokens) < max_new_tokens:
        logits = target(input_ids=torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True).logits
        tokens.append(int(logits[0, -1].argmax()))
    return tokens


@torch.inference_mode()
def hf_generate(target: Qwen3ForCausalLM, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    output = target.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return output[0, len(prompt) :].tolist()


class OracleDrafter:
    """Proposes the next tokens of a known sequence (prompt + greedy output) with one-hot probabilities."""

    def __init__(self, sequence: list[int], block_size: int, vocab_size: int) -> None:
        self.sequence = sequence
        self.block_size = block_size
        self.vocab_size = vocab_size

    def reset(self) -> None:
        pass

    def extend_context(self, features: torch.Tensor) -> None:
        pass

    def propose(
        self, anchor_token: int, position: int, temperature: float, generator: torch.Generator | None
    ) -> Proposal:
        tokens = torch.tensor(self.sequence[position + 1 : position + 1 + self.block_size], dtype=torch.long)
        probs = torch.zeros(len(tokens), self.vocab_size)
        probs[torch.arange(len(tokens)), tokens] = 1.0
        return Proposal(tokens=tokens, probs=probs)


class CostOnlyDrafter:
    """Runs a real drafter for its cost, then proposes the oracle's tokens in its place."""

    def __init__(self, drafter: DSparkDrafter, oracle: OracleDrafter) -> None:
        self.drafter = drafter
        self.oracle = oracle
        self.block_size = drafter.block_size

    def reset(self) -> None:
        self.drafter.reset()

    def extend_context(self, features: torch.Tensor) -> None:
        self.drafter.extend_context(features)

    def propose(
        self, anchor_token: int, position: int, temperature: float, generator: torch.Generator | None
    ) -> Proposal:
        self.drafter.propose(anchor_token, position, temperature, generator)
        return self.oracle.propose(anchor_token, position, temperature, generator)


def timed(
    decode: Callable[[Qwen3ForCausalLM, list[int], int], list[int]],
    target: Qwen3ForCausalLM,
    prompt: list[int],
    max_new_tokens: int,
) -> tuple[list[int], float]:
    started = time.perf_counter()
    tokens = decode(target, prompt, max_new_tokens)
    return tokens, time.perf_counter() - started


def run_speculative(
    target: Qwen3ForCausalLM,
    make_drafter: Callable[[list[int], list[int]], Drafter],
    prompts: list[list[int]],
    references: list[list[int]],
    max_new_tokens: int,
) -> dict[str, Any]:
    sums = AcceptanceSums()
    seconds = 0.0
    for prompt, reference in zip(prompts, references, strict=True):
        drafter = make_drafter(prompt, reference)
        started = time.perf_counter()
        result = speculative_generate(
            target,
            drafter,
            prompt,
            layer_ids=LAYER_IDS,
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            end_token_ids=[],
            generator=None,
        )
        seconds += time.perf_counter() - started
        if result.tokens != reference:
            raise RuntimeError("speculative greedy output differs from plain greedy decoding")
        sums.add_result(result)
    return {"tau": sums.tau, "rounds": sums.rounds, "seconds": seconds, "tokens_per_s": sums.generated_tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8, help="prompts decoded per method")
    parser.add_argument("--prompt-length", type=int, default=128, help="tokens per random prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=4, help="draft block size (tokens proposed per round)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0 keeps torch's default); batch-1 steps of a tiny model slow down with more "
        "threads when other processes share the cores",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    configure_runtime()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    target = build_target(args.seed)
    vocab_size = target.config.vocab_size
    generator = torch.Generator().manual_seed(args.seed)
    prompts = [
        torch.randint(0, vocab_size, (args.prompt_length,), generator=generator).tolist() for _ in range(args.prompts)
    ]
    plain_greedy(target, prompts[0], 4)  # warm-up: first-call allocations stay out of the timings

    references: list[list[int]] = []
    plain_seconds = 0.0
    for prompt in prompts:
        tokens, seconds = timed(plain_greedy, target, prompt, args.max_new_tokens)
        references.append(tokens)
        plain_seconds += seconds
    generated = sum(len(tokens) for tokens in references)
    plain_rate = generated / plain_seconds

    generate_seconds = sum(timed(hf_generate, target, prompt, args.max_new_tokens)[1] for prompt in prompts)

    draft = build_draft(
        target,
        layer_ids=LAYER_IDS,
        block_size=args.block_size,
        num_layers=1,
        num_anchors=64,
        markov_rank=32,
        markov_head_type="vanilla",
        enable_confidence_head=True,
        confidence_head_with_markov=True,
        mask_token_id=vocab_size - 1,
        seed=args.seed,
    ).eval()

    def oracle(prompt: list[int], reference: list[int]) -> OracleDrafter:
        return OracleDrafter(prompt + reference, args.block_size, vocab_size)

    methods: dict[str, Callable[[list[int], list[int]], Drafter]] = {
        "oracle": oracle,
        "dspark_untrained": lambda prompt, reference: DSparkDrafter(draft),
        "dspark_cost_oracle_tokens": lambda prompt, reference: CostOnlyDrafter(
            DSparkDrafter(draft), oracle(prompt, reference)
        ),
    }
    speculative: dict[str, Any] = {}
    for name, make_drafter in methods.items():
        row = run_speculative(target, make_drafter, prompts, references, args.max_new_tokens)
        row["speedup_over_plain"] = row["tokens_per_s"] / plain_rate
        speculative[name] = row

    print(
        json.dumps(
            {
                "benchmark": "speculative_speedup",
                "target": {
                    "layers": target.config.num_hidden_layers,
                    "hidden": target.config.hidden_size,
                    "vocab": vocab_size,
                },
                "settings": {
                    "prompts": args.prompts,
                    "prompt_length": args.prompt_length,
                    "max_new_tokens": args.max_new_tokens,
                    "block_size": args.block_size,
                    "threads": torch.get_num_threads(),
                    "temperature": 0.0,
                },
                "plain": {"tokens_per_s": plain_rate, "seconds": plain_seconds},
                "hf_generate": {"tokens_per_s": generated / generate_seconds, "seconds": generate_seconds},
                "speculative": speculative,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
