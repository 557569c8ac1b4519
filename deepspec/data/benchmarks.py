"""Speculative-decoding benchmarks: where each lives on the Hugging Face hub and how a row becomes turns.

A benchmark row becomes ``{"turns": [user turn, ...]}``, the format of the
benchmark JSONL files that DeepSpec ships in its ``eval_datasets`` folder. The
prompt wording below reproduces those files, so a set downloaded from the hub
yields the same text as the shipped file. Reading the hub is the job of
:mod:`deepspec.data.sources`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from deepspec.data.records import Rejection

REASONING_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."

LIVECODEBENCH_INSTRUCTION = (
    "You are an expert Python programmer. You will be given a question (problem specification) and will "
    "generate a correct Python program that matches the specification and passes all tests. You will NOT "
    "return anything except for the program\n\n"
)


@dataclass(frozen=True)
class BenchmarkSpec:
    """A benchmark's hub location and its row-to-turns formatter."""

    name: str
    hub_id: str
    hub_config: str | None
    hub_split: str
    format_turns: Callable[[dict[str, Any]], list[str]]
    # Repository files read directly, for sets that ``load_dataset`` cannot read as one dataset.
    files: tuple[str, ...] = field(default=())


def format_gsm8k(row: dict[str, Any]) -> list[str]:
    return [row["question"] + REASONING_SUFFIX]


def format_math_problem(row: dict[str, Any]) -> list[str]:
    return [row["problem"] + REASONING_SUFFIX]


def format_alpaca(row: dict[str, Any]) -> list[str]:
    if row["input"]:
        return [f"{row['instruction']}\n\nInput:\n{row['input']}"]
    return [row["instruction"]]


def format_mt_bench(row: dict[str, Any]) -> list[str]:
    turns = row["prompt"]
    if not isinstance(turns, list):
        raise TypeError(f"the prompt field must be a list of turns, got {type(turns).__name__}")
    return list(turns)


def format_humaneval(row: dict[str, Any]) -> list[str]:
    return [
        "Write a solution to the following problem and make sure that it passes the tests:\n"
        f"```python\n{row['prompt']}\n```"
    ]


def format_mbpp(row: dict[str, Any]) -> list[str]:
    return [row["prompt"]]


def format_lbpp(row: dict[str, Any]) -> list[str]:
    return [row["instruction"]]


def format_arena_hard(row: dict[str, Any]) -> list[str]:
    return [row["prompt"]]


def format_swe_bench(row: dict[str, Any]) -> list[str]:
    return [f"Problem Statement:\n{row['problem_statement']}\nPlease fix the issue described above."]


def format_livecodebench(row: dict[str, Any]) -> list[str]:
    if "messages" in row:
        turns = [message["content"] for message in row["messages"] if message["role"] == "user"]
        if not turns:
            raise ValueError("the row's messages contain no user message")
        return turns
    starter_code = row["starter_code"]
    if starter_code:
        label, code = "Use the following code structure:", starter_code
    else:
        label, code = "Write your code in the following format:", "# YOUR CODE HERE"
    return [
        f"{LIVECODEBENCH_INSTRUCTION}### Question:\n{row['question_content']}\n\n"
        f"### Format: {label}\n```python\n{code}\n```\n\n"
        "### Answer: (use the provided format with backticks)"
    ]


BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec("gsm8k", "openai/gsm8k", "main", "test", format_gsm8k),
        BenchmarkSpec("math500", "HuggingFaceH4/MATH-500", None, "test", format_math_problem),
        BenchmarkSpec("aime24", "HuggingFaceH4/aime_2024", None, "train", format_math_problem),
        BenchmarkSpec("aime25", "MathArena/aime_2025", None, "train", format_math_problem),
        BenchmarkSpec("alpaca", "tatsu-lab/alpaca", None, "train", format_alpaca),
        BenchmarkSpec("mt-bench", "HuggingFaceH4/mt_bench_prompts", None, "train", format_mt_bench),
        BenchmarkSpec("humaneval", "openai/openai_humaneval", None, "test", format_humaneval),
        BenchmarkSpec("mbpp", "google-research-datasets/mbpp", "sanitized", "test", format_mbpp),
        BenchmarkSpec("lbpp", "CohereLabs/lbpp", None, "test", format_lbpp, files=("python/test.parquet",)),
        BenchmarkSpec("swe-bench", "princeton-nlp/SWE-bench_Lite", None, "test", format_swe_bench),
        BenchmarkSpec(
            "livecodebench",
            "livecodebench/code_generation_lite",
            None,
            "test",
            format_livecodebench,
            files=tuple(f"test{suffix}.jsonl" for suffix in ("", "2", "3", "4", "5", "6")),
        ),
        BenchmarkSpec(
            "arena-hard-v2",
            "lmarena-ai/arena-hard-auto",
            None,
            "train",
            format_arena_hard,
            files=("data/arena-hard-v2.0/question.jsonl",),
        ),
    )
}


def benchmark_spec(name: str) -> BenchmarkSpec:
    """Return the registered benchmark called ``name``, or explain how to provide an unknown one."""
    spec = BENCHMARKS.get(name)
    if spec is None:
        known = ", ".join(sorted(BENCHMARKS))
        raise ValueError(
            f"data source {name!r} has no path or hf_id and is not a known benchmark (known: {known}). "
            f"Set path or hf_id for it, or put {name}.jsonl in data.data_dir"
        )
    return spec


def format_benchmark_rows(spec: BenchmarkSpec, rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any] | Rejection]:
    """Yield one ``{"turns": [...]}`` row per source row of benchmark ``spec``.

    A source row that the formatter cannot read (a missing field, a wrong type)
    is yielded as a :class:`Rejection` with reason ``invalid_benchmark_row``.
    """
    for index, row in enumerate(rows):
        try:
            turns = spec.format_turns(row)
        except (KeyError, TypeError, ValueError) as error:
            yield Rejection("invalid_benchmark_row", f"{spec.hub_id} row {index}: {error!r}", row=row)
            continue
        yield {"turns": turns}
