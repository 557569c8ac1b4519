"""Target loading by config, end-of-generation ids, layer lookup and layer-id validation."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    Gemma4VisionConfig,
    PretrainedConfig,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from deepspec.config import ConfigError, PipelineConfig, validate_config
from deepspec.targets import (
    decoder_layers,
    end_token_ids,
    final_norm,
    hidden_size,
    load_target,
    load_tokenizer,
    num_target_layers,
    resolve_target,
    validate_layer_ids,
)
from tests.conftest import shared_eval_dir

TINY_TOY = {
    "vocab_size": 300,
    "hidden_size": 32,
    "num_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
    "pretrain_steps": 4,
    "batch_size": 2,
    "seq_len": 32,
    "warmup_steps": 1,
    "heldout_every": 4,
}


def eval_data_dir() -> Path:
    """The benchmark prompt folder: ``$DEEPSPEC_DATA_DIR``, else the development checkout's copy."""
    value = os.environ.get("DEEPSPEC_DATA_DIR")
    return Path(value) if value else shared_eval_dir()


def pipeline_config(target: dict[str, Any], data_dir: Path | None = None) -> PipelineConfig:
    data: dict[str, Any] = {"sources": [{"name": "gsm8k", "path": "gsm8k.jsonl"}]}
    if data_dir is not None:
        data["data_dir"] = str(data_dir)
    return validate_config({"target": target, "data": data})


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A prompt folder with the first rows of two benchmark files."""
    folder = tmp_path / "prompts"
    folder.mkdir()
    for name, count in (("mt-bench.jsonl", 6), ("gsm8k.jsonl", 14)):
        with open(eval_data_dir() / name, encoding="utf-8") as handle:
            lines = [next(handle) for _ in range(count)]
        (folder / name).write_text("".join(lines), encoding="utf-8")
    (folder / "notes.txt").write_text("not a prompt file\n", encoding="utf-8")
    return folder


def tiny_qwen3(num_layers: int = 3) -> Qwen3ForCausalLM:
    config = Qwen3Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=64,
    )
    return Qwen3ForCausalLM(config)


def tiny_gemma4_config() -> Gemma4Config:
    text = Gemma4TextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        global_head_dim=16,
        vocab_size_per_layer_input=64,
        hidden_size_per_layer_input=8,
        layer_types=["sliding_attention", "full_attention"],
    )
    vision = Gemma4VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
    )
    return Gemma4Config(text_config=text, vision_config=vision, audio_config=None)


def test_resolve_target_keeps_hub_id_and_local_dir(tmp_path: Path) -> None:
    assert resolve_target(pipeline_config({"name_or_path": "Qwen/Qwen3-4B"})) == "Qwen/Qwen3-4B"
    assert resolve_target(pipeline_config({"name_or_path": str(tmp_path)})) == str(tmp_path)


def test_resolve_target_toy_needs_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEEPSPEC_DATA_DIR", raising=False)
    with pytest.raises(ConfigError, match="set data.data_dir or the DEEPSPEC_DATA_DIR environment variable"):
        resolve_target(pipeline_config({"name_or_path": "toy"}))


def test_resolve_target_toy_rejects_bad_data_dir(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError, match="is not a directory"):
        resolve_target(pipeline_config({"name_or_path": "toy"}, missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"contains no \*\.jsonl files"):
        resolve_target(pipeline_config({"name_or_path": "toy"}, empty))


def test_toy_target_from_data_dir_env(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPSPEC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DEEPSPEC_DATA_DIR", str(data_dir))
    config = pipeline_config({"name_or_path": "toy", "toy": TINY_TOY, "dtype": "bfloat16"})
    path = Path(resolve_target(config))
    assert path.parent == tmp_path / "cache" / "toy-target"
    metadata = json.loads((path / "toy_target.json").read_text(encoding="utf-8"))
    # mt-bench.jsonl sorts first, so row 0 is its first conversation; 6 + 14 rows in all.
    assert metadata["corpus_rows"] == 20
    assert metadata["heldout_rows"] == 5
    assert resolve_target(config) == str(path)

    tokenizer = load_tokenizer(config)
    assert tokenizer.eos_token_id == 2
    model = load_target(config)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.dtype == torch.bfloat16
    assert not model.training
    assert all(not parameter.requires_grad for parameter in model.parameters())
    assert end_token_ids(model, tokenizer) == [2]


def test_load_target_settings_from_local_dir(tmp_path: Path) -> None:
    model = tiny_qwen3()
    model.save_pretrained(tmp_path)
    config = pipeline_config({"name_or_path": str(tmp_path), "dtype": "float32", "attn_implementation": "eager"})
    loaded = load_target(config, device="cpu")
    assert loaded.dtype == torch.float32
    assert loaded.config._attn_implementation == "eager"
    assert loaded.device.type == "cpu"
    assert not loaded.training
    assert not any(parameter.requires_grad for parameter in loaded.parameters())
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_end_token_ids_sources(tmp_path: Path) -> None:
    from deepspec.targets.toy import train_tokenizer

    tokenizer = train_tokenizer(["some text to train on", "more text"], vocab_size=270, model_max_length=64)
    model = tiny_qwen3()
    model.generation_config.eos_token_id = 5
    assert end_token_ids(model, tokenizer) == [5]
    model.generation_config.eos_token_id = [7, 2, 7, 5, 2]
    assert end_token_ids(model, tokenizer) == [7, 2, 5]
    model.generation_config.eos_token_id = None
    assert end_token_ids(model, tokenizer) == [tokenizer.eos_token_id] == [2]
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="Qwen3ForCausalLM has no eos_token_id"):
        end_token_ids(model, tokenizer)


def test_layers_and_norm_of_qwen3() -> None:
    model = tiny_qwen3(num_layers=3)
    assert decoder_layers(model) is model.model.layers
    assert len(decoder_layers(model)) == 3
    assert final_norm(model) is model.model.norm
    assert num_target_layers(model.config) == 3
    assert hidden_size(model.config) == 16


def test_layers_and_norm_of_gemma4_multimodal() -> None:
    config = tiny_gemma4_config()
    model = Gemma4ForConditionalGeneration(config)
    assert decoder_layers(model) is model.model.language_model.layers
    assert final_norm(model) is model.model.language_model.norm
    assert num_target_layers(config) == 2
    assert hidden_size(config) == 32


def test_layers_of_unknown_model_raise() -> None:
    class Plain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    with pytest.raises(ValueError, match="decoder layers of Plain"):
        decoder_layers(Plain())
    with pytest.raises(ValueError, match="final norm of Plain"):
        final_norm(Plain())


def test_config_without_sizes_raises() -> None:
    config = PretrainedConfig()
    with pytest.raises(ValueError, match="has no num_hidden_layers"):
        num_target_layers(config)
    with pytest.raises(ValueError, match="has no hidden_size"):
        hidden_size(config)


@pytest.mark.parametrize("layer_ids", [[0], [-1], [-1, 0, 2], [1, 2], [0, 1, 2]])
def test_validate_layer_ids_accepts(layer_ids: list[int]) -> None:
    validate_layer_ids(layer_ids, num_layers=4)


@pytest.mark.parametrize(
    ("layer_ids", "message"),
    [
        ([1, 3], r"cache.layer_ids=\[1, 3\] contains 3, the target's last layer: .*after the final norm"),
        ([0, 4], r"contains 4, outside \[-1, 2\]"),
        ([-2, 0], r"contains -2, outside \[-1, 2\] \(-1 is the embedding output\)"),
        ([2, 1], r"must be strictly increasing \(2 then 1\)"),
        ([1, 1], r"must be strictly increasing \(1 then 1\)"),
        ([], r"cache.layer_ids is empty"),
    ],
)
def test_validate_layer_ids_rejects(layer_ids: list[int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_layer_ids(layer_ids, num_layers=4)


def test_validate_layer_ids_names_key() -> None:
    with pytest.raises(ConfigError, match=r"^draft.target_layer_ids=\[5\]"):
        validate_layer_ids([5], num_layers=6, key="draft.target_layer_ids")
