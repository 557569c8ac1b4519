"""Draft checkpoints in the layout of DeepSpec's released drafts: bf16, sharded, reference names.

The reference layouts come from the parity fixtures under ``$DEEPSPEC_PARITY_DIR``
(default: ``shared/fixtures/parity`` beside the repository): each case's
``draft_config.json`` is the ``config.json`` DeepSpec writes, and its
``weights.safetensors`` minus the ``target.`` keys is the checkpoint's tensor set.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, Qwen3Config, Qwen3ForCausalLM

from deepspec.drafts.checkpoint import (
    CONFIG_NAME,
    INDEX_NAME,
    WEIGHTS_NAME,
    check_draft_matches_target,
    checkpoint_content_hash,
    load_draft,
    load_draft_config,
    save_reference_draft,
)
from deepspec.drafts.dspark import Qwen3DSparkModel, build_draft
from deepspec.drafts.dspark_drafter import DSparkDrafter
from deepspec.drafts.registry import (
    ARCHITECTURES,
    DraftArchitecture,
    UnsupportedArchitectureError,
    available_architectures,
    get_architecture,
    known_architectures,
)

DEFAULT_PARITY_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "parity"
PARITY_DIR = Path(os.environ.get("DEEPSPEC_PARITY_DIR", DEFAULT_PARITY_DIR))
PARITY_CASES = sorted(path.name for path in PARITY_DIR.glob("*") if (path / "draft_config.json").is_file())
# config.json keys whose values depend on how and where the checkpoint was written, not on the draft.
WRITER_KEYS = ("dtype", "transformers_version")

VOCAB, HIDDEN = 64, 16


def tiny_target(**overrides) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    settings = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=4,
        max_position_embeddings=128,
    )
    settings.update(overrides)
    return Qwen3ForCausalLM(Qwen3Config(**settings))


def tiny_draft() -> Qwen3DSparkModel:
    draft = build_draft(
        tiny_target(),
        layer_ids=[0, 2],
        block_size=3,
        num_layers=2,
        num_anchors=4,
        markov_rank=4,
        markov_head_type="vanilla",
        enable_confidence_head=True,
        confidence_head_with_markov=True,
        mask_token_id=VOCAB - 1,
        seed=1,
    )
    # Move every trainable tensor off its initial value, so a tensor mixed up on load changes the outputs.
    with torch.no_grad():
        for parameter in draft.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    return draft.eval()


def draft_outputs(model: Qwen3DSparkModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return training logits, confidence logits and one drafting round's probabilities."""
    generator = torch.Generator().manual_seed(0)
    loss_mask = torch.ones(2, 10, dtype=torch.long)
    loss_mask[:, :3] = 0
    hidden = torch.randn(2, 10, 2 * HIDDEN, generator=generator)
    batch = {
        "input_ids": torch.randint(0, VOCAB - 1, (2, 10), generator=generator),
        "target_hidden_states": hidden.to(model.fc.weight.dtype),
        "loss_mask": loss_mask,
        "anchor_positions": torch.tensor([[3, 5, 6, 8], [3, 4, 7, 8]]),
        "block_keep_mask": torch.ones(2, 4, dtype=torch.bool),
    }
    with torch.no_grad():
        trained = model.forward_train(**batch)
    drafter = DSparkDrafter(model)
    drafter.extend_context(hidden[0, :5].to(model.fc.weight.dtype))
    proposal = drafter.propose(7, 5, 0.0, None)
    return trained.draft_logits, trained.confidence_pred, proposal.probs


def write_fixture_checkpoint(case: str, directory: Path) -> dict[str, torch.Tensor]:
    """Lay a parity case out as DeepSpec's ``save_pretrained`` does; return its tensors."""
    folder = PARITY_DIR / case
    directory.mkdir(parents=True)
    shutil.copy(folder / "draft_config.json", directory / CONFIG_NAME)
    weights = load_file(folder / "weights.safetensors")
    tensors = {name: tensor for name, tensor in weights.items() if not name.startswith("target.")}
    save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    return tensors


def fixture_architecture(case: str) -> str:
    config = json.loads((PARITY_DIR / case / "draft_config.json").read_text(encoding="utf-8"))
    return config["architectures"][0]


def read_shards(directory: Path) -> dict[str, torch.Tensor]:
    index = json.loads((directory / INDEX_NAME).read_text(encoding="utf-8"))
    tensors: dict[str, torch.Tensor] = {}
    for filename in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(directory / filename))
    return tensors


def test_parity_cases_present():
    assert PARITY_CASES, f"no parity case with a draft_config.json in {PARITY_DIR}; set DEEPSPEC_PARITY_DIR"
    architectures = {case: fixture_architecture(case) for case in PARITY_CASES}
    unknown = {case: arch for case, arch in architectures.items() if arch not in ARCHITECTURES}
    assert not unknown, f"parity cases whose architecture is not registered: {unknown}"


def test_round_trip_bf16_sharded(tmp_path):
    draft = tiny_draft()
    save_reference_draft(draft, tmp_path, max_shard_size=4000)

    index = json.loads((tmp_path / INDEX_NAME).read_text(encoding="utf-8"))
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) > 1
    assert not (tmp_path / WEIGHTS_NAME).exists()
    assert sorted(index["weight_map"]) == sorted(draft.state_dict())
    stored = read_shards(tmp_path)
    assert {tensor.dtype for tensor in stored.values()} == {torch.bfloat16}
    assert index["metadata"]["total_size"] == sum(tensor.numel() * 2 for tensor in stored.values())
    config = json.loads((tmp_path / CONFIG_NAME).read_text(encoding="utf-8"))
    assert config["dtype"] == "bfloat16"
    assert config["architectures"] == ["Qwen3DSparkModel"]

    loaded = load_draft(tmp_path)
    assert type(loaded) is Qwen3DSparkModel
    assert loaded.fc.weight.dtype == torch.bfloat16
    frozen = [name for name, parameter in loaded.named_parameters() if not parameter.requires_grad]
    assert frozen == ["embed_tokens.weight", "lm_head.weight"]
    reference = copy.deepcopy(draft).to(torch.bfloat16)
    for expected, actual in zip(draft_outputs(reference), draft_outputs(loaded), strict=True):
        assert torch.equal(expected, actual)
    # Against the float32 original the outputs agree to bf16 precision.
    for expected, actual in zip(draft_outputs(draft), draft_outputs(loaded), strict=True):
        assert torch.allclose(expected, actual.float(), rtol=0.05, atol=0.05)


def test_round_trip_loads_as_float32(tmp_path):
    draft = tiny_draft()
    save_reference_draft(draft, tmp_path)
    assert (tmp_path / WEIGHTS_NAME).is_file()
    assert not (tmp_path / INDEX_NAME).exists()
    loaded = load_draft(tmp_path, dtype=torch.float32)
    assert loaded.fc.weight.dtype == torch.float32
    assert torch.equal(loaded.fc.weight, draft.fc.weight.to(torch.bfloat16).float())


def test_tiny_config_matches_reference_fields(tmp_path):
    save_reference_draft(tiny_draft(), tmp_path)
    ours = json.loads((tmp_path / CONFIG_NAME).read_text(encoding="utf-8"))
    reference = json.loads((PARITY_DIR / "dspark_qwen3_vanilla" / "draft_config.json").read_text(encoding="utf-8"))
    assert set(ours) == set(reference)


@pytest.mark.parametrize("case", PARITY_CASES)
def test_fixture_checkpoint_loads_by_name(case, tmp_path):
    architecture = fixture_architecture(case)
    reference_dir = tmp_path / "reference"
    tensors = write_fixture_checkpoint(case, reference_dir)
    if architecture not in available_architectures():
        with pytest.raises(UnsupportedArchitectureError, match=f"architecture {architecture} is not supported yet"):
            load_draft(reference_dir)
        return

    model = load_draft(reference_dir)
    assert type(model).__name__ == architecture
    state = model.state_dict()
    assert sorted(state) == sorted(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(state[name], tensor), name

    save_reference_draft(model, tmp_path / "ours", max_shard_size=200_000)
    ours = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text(encoding="utf-8"))
    reference = json.loads((reference_dir / CONFIG_NAME).read_text(encoding="utf-8"))
    assert set(ours) == set(reference)
    for key in WRITER_KEYS:
        ours.pop(key)
        reference.pop(key)
    assert ours == reference
    assert sorted(read_shards(tmp_path / "ours")) == sorted(tensors)


def test_unknown_architecture_lists_known(tmp_path):
    save_reference_draft(tiny_draft(), tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text(encoding="utf-8"))
    config["architectures"] = ["LlamaDSparkModel"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(UnsupportedArchitectureError) as error:
        load_draft(tmp_path)
    assert "architecture LlamaDSparkModel is not supported; known: " in str(error.value)
    for name in known_architectures():
        assert name in str(error.value)


def test_missing_module_named(tmp_path, monkeypatch):
    save_reference_draft(tiny_draft(), tmp_path)
    absent = DraftArchitecture("Qwen3DSparkModel", "deepspec.drafts.absent_module", "dspark", "qwen3", ("qwen3",))
    monkeypatch.setitem(ARCHITECTURES, "Qwen3DSparkModel", absent)
    with pytest.raises(UnsupportedArchitectureError) as error:
        load_draft(tmp_path)
    assert "architecture Qwen3DSparkModel is not supported yet" in str(error.value)
    assert "deepspec.drafts.absent_module" in str(error.value)


def test_registry_entries_import():
    assert "Qwen3DSparkModel" in available_architectures()
    assert get_architecture("Qwen3DSparkModel").model_class() is Qwen3DSparkModel
    assert set(known_architectures()) == {
        "Qwen3DSparkModel",
        "Gemma4DSparkModel",
        "Qwen3Eagle3Model",
        "Gemma4Eagle3Model",
    }


def test_model_type_mismatch_rejected(tmp_path):
    save_reference_draft(tiny_draft(), tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text(encoding="utf-8"))
    config["model_type"] = "llama"
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ValueError, match="model_type is 'llama', but Qwen3DSparkModel drafts have model_type 'qwen3'"):
        load_draft_config(tmp_path)


def test_extra_and_missing_tensor_named(tmp_path):
    save_reference_draft(tiny_draft(), tmp_path, max_shard_size=4000)
    index = json.loads((tmp_path / INDEX_NAME).read_text(encoding="utf-8"))
    shard = index["weight_map"]["layers.1.mlp.up_proj.weight"]
    tensors = load_file(tmp_path / shard)
    del tensors["layers.1.mlp.up_proj.weight"]
    tensors["markov_head.gate_proj.weight"] = torch.zeros(4, HIDDEN + 4, dtype=torch.bfloat16)
    save_file(tensors, tmp_path / shard, metadata={"format": "pt"})
    del index["weight_map"]["layers.1.mlp.up_proj.weight"]
    index["weight_map"]["markov_head.gate_proj.weight"] = shard
    (tmp_path / INDEX_NAME).write_text(json.dumps(index), encoding="utf-8")

    with pytest.raises(ValueError) as error:
        load_draft(tmp_path)
    assert "missing tensors ['layers.1.mlp.up_proj.weight']" in str(error.value)
    assert "unexpected tensors ['markov_head.gate_proj.weight']" in str(error.value)
    assert "(Qwen3DSparkModel)" in str(error.value)


def test_index_entry_without_shard_named(tmp_path):
    save_reference_draft(tiny_draft(), tmp_path, max_shard_size=4000)
    index = json.loads((tmp_path / INDEX_NAME).read_text(encoding="utf-8"))
    shard = index["weight_map"]["norm.weight"]
    tensors = load_file(tmp_path / shard)
    del tensors["norm.weight"]
    save_file(tensors, tmp_path / shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lists tensors that no shard contains: \['norm.weight'\]"):
        load_draft(tmp_path)


@pytest.mark.parametrize(
    ("target_settings", "message"),
    [
        ({"vocab_size": 128}, "vocab_size: draft 64 != target 128"),
        ({"hidden_size": 32, "head_dim": 8}, "hidden_size: draft 16 != target 32"),
        ({"num_hidden_layers": 6}, "num_target_layers: draft 4 != target num_hidden_layers 6"),
        ({"num_hidden_layers": 3}, r"target_layer_ids: target_layer_ids \[2\] are invalid for a target with 3 layers"),
    ],
)
def test_mismatched_target_rejected(tmp_path, target_settings, message):
    save_reference_draft(tiny_draft(), tmp_path)
    config = load_draft_config(tmp_path)
    check_draft_matches_target(config, tiny_target().config)
    with pytest.raises(ValueError, match=message) as error:
        check_draft_matches_target(config, tiny_target(**target_settings).config)
    assert "Use the target the draft was trained for" in str(error.value)


def test_load_checks_target_first(tmp_path):
    save_reference_draft(tiny_draft(), tmp_path)
    assert type(load_draft(tmp_path, target_config=tiny_target().config)) is Qwen3DSparkModel
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(ValueError, match=f"draft checkpoint {tmp_path}: .*vocab_size: draft 64 != target 128"):
        load_draft(tmp_path, target_config=tiny_target(vocab_size=128).config)


def test_mismatched_layer_ids_rejected(tmp_path):
    save_reference_draft(tiny_draft(), tmp_path)
    config = load_draft_config(tmp_path)
    check_draft_matches_target(config, tiny_target().config, layer_ids=[0, 2])
    with pytest.raises(ValueError, match=r"target_layer_ids: draft \[0, 2\] != cached layer ids \[1, 2\]") as error:
        check_draft_matches_target(config, tiny_target().config, layer_ids=[1, 2])
    assert "set cache.layer_ids to [0, 2]" in str(error.value)


def test_wrong_target_family_rejected(tmp_path):
    save_reference_draft(tiny_draft(), tmp_path)
    config = load_draft_config(tmp_path)
    target_config = tiny_target().config
    target_config.model_type = "llama"
    with pytest.raises(ValueError, match="needs a target of model_type 'qwen3'"):
        check_draft_matches_target(config, target_config)


def test_gemma4_draft_checked_on_text_config(tmp_path):
    case = "dspark_gemma4_vanilla"
    write_fixture_checkpoint(case, tmp_path / "draft")
    config = load_draft_config(tmp_path / "draft")
    case_config = json.loads((PARITY_DIR / case / "config.json").read_text(encoding="utf-8"))
    target_values = case_config["target_config (tiny; the draft config copies it)"]
    target_config = AutoConfig.for_model(target_values.pop("model_type"), **target_values)
    assert target_config.model_type == "gemma4"
    check_draft_matches_target(config, target_config)
    with pytest.raises(ValueError, match="needs a target of model_type 'gemma4' or 'gemma4_text'"):
        check_draft_matches_target(config, tiny_target(vocab_size=512, hidden_size=64, head_dim=16).config)


def test_content_hash_follows_bytes(tmp_path):
    draft = tiny_draft()
    save_reference_draft(draft, tmp_path / "a", max_shard_size=4000)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert checkpoint_content_hash(tmp_path / "a") == checkpoint_content_hash(tmp_path / "b")
    with torch.no_grad():
        draft.fc.weight[0, 0] += 1.0
    save_reference_draft(draft, tmp_path / "b", max_shard_size=4000)
    assert checkpoint_content_hash(tmp_path / "a") != checkpoint_content_hash(tmp_path / "b")
