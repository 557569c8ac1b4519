"""The regen stage with the openai backend, against a scripted OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from transformers import AutoTokenizer

from deepspec.cli import main
from deepspec.config import PipelineConfig
from deepspec.data.stage import run_prompts
from deepspec.manifest import StageError, read_manifest
from deepspec.pipeline import stage_output
from deepspec.regen import shards
from deepspec.regen.shards import ShardSpec
from deepspec.regen.stage import finalize_regen, run_regen
from tests.openai_server import Behaviour, FakeOpenAIServer

QUESTIONS = [f"Question number {n}: what is {n} plus {n}?" for n in range(1, 6)]


def write_source(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def make_config(target_dir: Path, root: Path, source: Path, urls: list[str], **regen: Any) -> PipelineConfig:
    openai = {
        "endpoints": urls,
        "model": "fake-model",
        "max_in_flight_per_endpoint": 1,
        "max_retries": 0,
        "backoff_base_s": 0.0,
        "ready_timeout_s": 10.0,
        "max_consecutive_failures": 3,
        **regen.pop("openai", {}),
    }
    raw = {
        "target": {"name_or_path": str(target_dir)},
        "data": {"sources": [{"name": "t", "path": str(source)}], "heldout_fraction": 0.0001},
        "regen": {"backend": "openai", "max_new_tokens": 16, "batch_size": 2, "min_kept_fraction": 0.0, **regen},
        "storage": {"root": str(root)},
        "openai": openai,
    }
    raw["regen"]["openai"] = raw.pop("openai")
    return PipelineConfig.model_validate(raw)


def prepare(config: PipelineConfig) -> list[dict[str, Any]]:
    """Build the prompts output and return its train records sorted by id."""
    prompts = run_prompts(config)
    records = [json.loads(line) for line in (prompts / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    return sorted(records, key=lambda record: record["id"])


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def last_user(body: dict[str, Any]) -> str:
    return [message["content"] for message in body["messages"] if message["role"] == "user"][-1]


def question_of(record: dict[str, Any]) -> str:
    return next(message["content"] for message in record["messages"] if message["role"] == "user")


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return write_source(tmp_path / "prompts.jsonl", [{"turns": [question]} for question in QUESTIONS])


def test_rejects_counted_by_reason(tiny_target_dir, tmp_path):
    rows = [{"turns": ["please truncate"]}, {"turns": ["think only"]}, {"turns": ["answer cleanly"]}]
    source = write_source(tmp_path / "prompts.jsonl", rows)
    with FakeOpenAIServer() as server:

        def scripted(body: dict[str, Any]) -> str:
            # The server reads these fields after calling reply, so each question sets its own finish.
            question = last_user(body)
            behaviour = server.behaviour
            behaviour.finish_reason = "length" if question == "please truncate" else "stop"
            behaviour.null_content = question == "think only"
            behaviour.reasoning = "Let me think." if question == "think only" else None
            return f"echo: {question}"

        server.behaviour = Behaviour(reply=scripted)
        config = make_config(tiny_target_dir, tmp_path / "runs", source, [server.base_url])
        prepare(config)
        output = run_regen(config)

    records = read_jsonl(output / "records.jsonl")
    assert [question_of(record) for record in records] == ["answer cleanly"]
    assert records[0]["messages"][-1] == {"role": "assistant", "content": "echo: answer cleanly"}
    rejects = {question_of(entry["record"]): entry["reason"] for entry in read_jsonl(output / "rejects.jsonl")}
    assert rejects == {"please truncate": "length", "think only": "reasoning_only"}
    manifest = read_manifest(output)
    assert manifest["rejected"] == {"length": 1, "reasoning_only": 1}
    assert manifest["counts"]["rejected"] == 2
    assert manifest["counts"]["out"] == 1
    assert manifest["regen"]["model"] == "fake-model"


def test_resume_generates_remaining_records_once(tiny_target_dir, tmp_path, source):
    with FakeOpenAIServer() as server:
        answered: list[str] = []

        def fail_after_three(body: dict[str, Any]) -> str:
            answered.append(last_user(body))
            if len(answered) == 3:
                # From the next request on, the server answers 503 and the run stops after 2 failures in a row.
                server.behaviour = Behaviour(fail_first=10**9, fail_status=503)
            return f"echo: {last_user(body)}"

        server.behaviour = Behaviour(reply=fail_after_three)
        limit = {"max_consecutive_failures": 2}
        config = make_config(tiny_target_dir, tmp_path / "runs", source, [server.base_url], openai=limit)
        records = prepare(config)
        assert len(records) == 5
        with pytest.raises(StageError, match="run the same command again to resume"):
            run_regen(config)
        output = stage_output(config, "regen")
        assert read_manifest(output) is None
        shard = shards.shard_dir(output, ShardSpec())
        done = [question_of(record) for record in read_jsonl(shard / shards.RECORDS_NAME)]
        assert done == [question_of(record) for record in records[:3]]
        assert len(read_jsonl(shard / shards.FAILURES_NAME)) == 1

        # A crash in the middle of a write leaves a torn line; it must be dropped and that record redone.
        with open(shard / shards.RECORDS_NAME, "a", encoding="utf-8") as handle:
            handle.write('{"id": "' + records[3]["id"] + '", "messa')
        # The source changes: rows re-ordered and one already answered row removed.
        removed = question_of(records[1])
        kept_rows = [{"turns": [question]} for question in reversed(QUESTIONS) if question != removed]
        write_source(source, kept_rows)
        shutil.rmtree(stage_output(config, "prompts"))
        prepare(config)

        before = len(server.completions())
        server.behaviour = Behaviour()
        run_regen(config)
        resumed = sorted(last_user(body) for body in server.completions()[before:])

    assert resumed == sorted(question_of(record) for record in records[3:])
    final = read_jsonl(output / "records.jsonl")
    assert sorted(question_of(record) for record in final) == sorted(q for q in QUESTIONS if q != removed)
    assert len({record["id"] for record in final}) == len(final)
    assert read_jsonl(output / shards.FAILURES_NAME) == []
    for record in final:
        assert record["messages"][-1] == {"role": "assistant", "content": f"echo: {question_of(record)}"}


def test_resume_with_changed_settings_stops(tiny_target_dir, tmp_path, source, monkeypatch):
    target = tmp_path / "target"
    shutil.copytree(tiny_target_dir, target)
    with FakeOpenAIServer(Behaviour(fail_first=10**9, fail_status=503)) as server:
        config = make_config(target, tmp_path / "runs", source, [server.base_url])
        prepare(config)
        with pytest.raises(StageError):
            run_regen(config)

        # Sampling settings are part of the fingerprint, so a config edit starts a new output. Requests built
        # differently from the same config (another deepspec version) must not resume the old one.
        from deepspec.regen import openai_backend

        original = openai_backend.sampling_settings

        def other_sampling(settings: Any) -> dict[str, Any]:
            return {**original(settings), "top_k": 20, "min_p": 0.05}

        monkeypatch.setattr(openai_backend, "sampling_settings", other_sampling)
        with pytest.raises(StageError, match=r"sampling\.min_p.*sampling\.top_k"):
            run_regen(config)
        monkeypatch.undo()

        # The chat template edited in place: same path, same fingerprint, other prompts.
        tokenizer = AutoTokenizer.from_pretrained(target)
        tokenizer.chat_template = tokenizer.chat_template.replace("'\\n'", "'\\n\\n'", 1)
        tokenizer.save_pretrained(target)
        with pytest.raises(StageError, match="chat_template_sha256"):
            run_regen(config)


def test_two_shards_equal_unsharded_run(tiny_target_dir, tmp_path, source, monkeypatch):
    with FakeOpenAIServer() as server:
        whole = make_config(tiny_target_dir, tmp_path / "whole", source, [server.base_url])
        prepare(whole)
        expected = read_jsonl(run_regen(whole) / "records.jsonl")

        config_path = tmp_path / "sharded.yaml"
        sharded = make_config(tiny_target_dir, tmp_path / "sharded", source, [server.base_url])
        config_path.write_text(yaml.safe_dump(sharded.model_dump(mode="json")), encoding="utf-8")
        prepare(sharded)
        assert stage_output(sharded, "regen").name == stage_output(whole, "regen").name
        assert main(["regen", "--config", str(config_path), "--shard-index", "0", "--num-shards", "2"]) == 0
        output = stage_output(sharded, "regen")
        assert read_manifest(output) is None
        with pytest.raises(StageError, match="00001-of-00002"):
            finalize_regen(sharded)
        monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
        assert main(["regen", "--config", str(config_path), "--num-shards", "2"]) == 0
        assert read_manifest(output) is None
        assert main(["regen", "--config", str(config_path), "--finalize"]) == 0

    assert read_manifest(output)["counts"]["shards"] == 2
    assert read_jsonl(output / "records.jsonl") == expected
    owned = [len(read_jsonl(shards.shard_dir(output, ShardSpec(i, 2)) / shards.RECORDS_NAME)) for i in range(2)]
    assert sum(owned) == 5


def test_http_400_goes_to_failures(tiny_target_dir, tmp_path, source):
    behaviour = Behaviour(fail_first=2, fail_status=400, fail_message="prompt is too long for this server")
    with FakeOpenAIServer(behaviour) as server:
        config = make_config(tiny_target_dir, tmp_path / "runs", source, [server.base_url])
        prepare(config)
        output = run_regen(config)

    failures = read_jsonl(output / shards.FAILURES_NAME)
    assert len(failures) == 2
    assert all("400" in entry["error"] and "too long" in entry["error"] for entry in failures)
    kept = read_jsonl(output / "records.jsonl")
    assert len(kept) == 3
    assert {entry["id"] for entry in failures}.isdisjoint(record["id"] for record in kept)
    assert read_manifest(output)["counts"]["failed"] == 2


def test_multi_turn_regenerated_turn_by_turn(tiny_target_dir, tmp_path):
    row = {
        "messages": [
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "a given answer that must be replaced"},
            {"role": "user", "content": "second question"},
        ]
    }
    source = write_source(tmp_path / "prompts.jsonl", [row])
    with FakeOpenAIServer() as server:
        config = make_config(tiny_target_dir, tmp_path / "runs", source, [server.base_url])
        prepare(config)
        output = run_regen(config)
        sent = [body["messages"] for body in server.completions()]

    assert sent == [
        [{"role": "user", "content": "first question"}],
        [
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "echo: first question"},
            {"role": "user", "content": "second question"},
        ],
    ]
    (record,) = read_jsonl(output / "records.jsonl")
    assert record["messages"] == [*sent[1], {"role": "assistant", "content": "echo: second question"}]


# A Qwen3-style chat template: answers after the last user turn carry a think block built from
# reasoning_content (or from a think block inside the content); earlier answers are rendered bare.
QWEN3_STYLE_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- set content = m.content or '' -%}"
    "{%- set reasoning = m.reasoning_content or '' -%}"
    "{%- if not reasoning and '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1] -%}"
    "{%- set content = content.split('</think>')[-1] -%}"
    "{%- endif -%}"
    "{%- if loop.index0 > ns.last_user -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' "
    "+ content.lstrip('\\n') + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>assistant\\n' + content.lstrip('\\n') + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}{%- endif -%}"
)
RAW_OUTPUT = "<think>\nTwo and two: count them.\n</think>\n\nThe answer is 4."


@pytest.fixture(scope="module")
def qwen3_style_target(tiny_target_dir, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("qwen3-style-target")
    tokenizer = AutoTokenizer.from_pretrained(tiny_target_dir)
    tokenizer.chat_template = QWEN3_STYLE_TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize(
    "behaviour",
    [
        # vLLM's qwen3 reasoning parser keeps the newlines around the reasoning and before the answer.
        Behaviour(reasoning="\nTwo and two: count them.\n", reply=lambda body: "\n\nThe answer is 4."),
        # Other parsers strip them.
        Behaviour(
            reasoning="Two and two: count them.", reply=lambda body: "The answer is 4.", reasoning_field="reasoning"
        ),
        # No reasoning parser: the think block arrives inside the content.
        Behaviour(reply=lambda body: RAW_OUTPUT),
    ],
    ids=["reasoning-field-vllm", "reasoning-field-stripped", "raw-content"],
)
def test_thinking_turn_renders_to_produced_tokens(qwen3_style_target, tmp_path, behaviour):
    from deepspec.data.chat import render_chat_text, render_training_example

    source = write_source(tmp_path / "prompts.jsonl", [{"turns": ["What is 2 plus 2?"]}])
    with FakeOpenAIServer(behaviour) as server:
        config = make_config(qwen3_style_target, tmp_path / "runs", source, [server.base_url], enable_thinking=True)
        prepare(config)
        output = run_regen(config)
        (body,) = server.completions()
    assert body["chat_template_kwargs"] == {"enable_thinking": True}

    (record,) = read_jsonl(output / "records.jsonl")
    assert record["messages"][-1] == {
        "role": "assistant",
        "content": "The answer is 4.",
        "reasoning_content": "Two and two: count them.",
    }
    tokenizer = AutoTokenizer.from_pretrained(qwen3_style_target)
    prompt = render_chat_text(tokenizer, record["messages"][:-1], add_generation_prompt=True, enable_thinking=True)
    produced = tokenizer(prompt + RAW_OUTPUT + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
    rendered = render_chat_text(tokenizer, record["messages"], add_generation_prompt=False)
    assert tokenizer(rendered, add_special_tokens=False)["input_ids"] == produced

    example = render_training_example(tokenizer, record["messages"], max_length=512)
    prompt_length = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert example.input_ids == produced
    assert example.loss_mask == [0] * prompt_length + [1] * (len(produced) - prompt_length)


def test_thinking_multi_turn_history_drops_reasoning(qwen3_style_target, tmp_path):
    from deepspec.data.chat import render_chat_text, render_training_example

    source = write_source(tmp_path / "prompts.jsonl", [{"turns": ["What is 2 plus 2?", "And 3 plus 3?"]}])
    with FakeOpenAIServer(Behaviour(reply=lambda body: RAW_OUTPUT)) as server:
        config = make_config(qwen3_style_target, tmp_path / "runs", source, [server.base_url], enable_thinking=True)
        prepare(config)
        output = run_regen(config)
        second_request = server.completions()[1]["messages"]

    # Earlier answers are sent without their reasoning, as the template would render them.
    assert second_request[1] == {"role": "assistant", "content": "The answer is 4."}
    (record,) = read_jsonl(output / "records.jsonl")
    assert [message.get("reasoning_content") for message in record["messages"]] == [
        None,
        "Two and two: count them.",
        None,
        "Two and two: count them.",
    ]
    tokenizer = AutoTokenizer.from_pretrained(qwen3_style_target)
    example = render_training_example(tokenizer, record["messages"], max_length=512)
    supervised = tokenizer.decode([t for t, m in zip(example.input_ids, example.loss_mask, strict=True) if m])
    full = render_chat_text(tokenizer, record["messages"], add_generation_prompt=False)
    assert full.count("<think>") == 1
    assert supervised == "The answer is 4.<|im_end|>\n" + RAW_OUTPUT + "<|im_end|>\n"
