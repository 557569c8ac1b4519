import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3Config, Qwen3ForCausalLM

from deepspec.drafts.checkpoint import (
    INDEX_NAME,
    WEIGHTS_NAME,
    check_draft_matches_target,
    load_draft,
    parse_shard_size,
    save_draft,
)
from deepspec.drafts.dspark import Qwen3DSparkModel, build_draft
from deepspec.drafts.dspark_drafter import DSparkDrafter

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


def tiny_draft(head: str = "rnn") -> Qwen3DSparkModel:
    draft = build_draft(
        tiny_target(),
        layer_ids=[0, 2],
        block_size=3,
        num_layers=2,
        num_anchors=4,
        markov_rank=4,
        markov_head_type=head,
        enable_confidence_head=True,
        confidence_head_with_markov=True,
        mask_token_id=VOCAB - 1,
        seed=1,
    )
    # Non-trivial norm and bias values, so a tensor mixed up on load changes the outputs.
    with torch.no_grad():
        for _name, parameter in draft.named_parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    return draft.eval()


def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    loss_mask = torch.ones(2, 10, dtype=torch.long)
    loss_mask[:, :3] = 0
    return {
        "input_ids": torch.randint(0, VOCAB - 1, (2, 10), generator=generator),
        "target_hidden_states": torch.randn(2, 10, 2 * HIDDEN, generator=generator),
        "loss_mask": loss_mask,
        "target_last_hidden_states": torch.randn(2, 10, HIDDEN, generator=generator),
        "anchor_positions": torch.tensor([[3, 5, 6, 8], [3, 4, 7, 8]]),
        "block_keep_mask": torch.ones(2, 4, dtype=torch.bool),
    }


def outputs(model: Qwen3DSparkModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        trained = model.forward_train(**batch())
    drafter = DSparkDrafter(model)
    drafter.extend_context(batch()["target_hidden_states"][0, :5].to(model.fc.weight.dtype))
    proposal = drafter.propose(7, 5, 0.0, None)
    return trained.draft_logits, trained.confidence_pred, proposal.probs


def test_round_trip_fp32_single_file(tmp_path):
    draft = tiny_draft()
    save_draft(draft, tmp_path)
    assert (tmp_path / WEIGHTS_NAME).is_file()
    assert not (tmp_path / INDEX_NAME).exists()
    loaded = load_draft(tmp_path)
    for original, restored in zip(outputs(draft), outputs(loaded), strict=False):
        assert torch.equal(original, restored)
    assert [n for n, p in loaded.named_parameters() if not p.requires_grad] == ["embed_tokens.weight", "lm_head.weight"]


def test_round_trip_bf16_sharded_index(tmp_path):
    draft = tiny_draft()
    save_draft(draft, tmp_path, dtype=torch.bfloat16, max_shard_size=4000)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) > 1
    assert not (tmp_path / WEIGHTS_NAME).exists()
    assert sorted(index["weight_map"]) == sorted(draft.state_dict())
    stored = {}
    for name in shard_files:
        stored.update(load_file(tmp_path / name))
    assert all(tensor.dtype == torch.bfloat16 for tensor in stored.values())
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in stored.values())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert config["architectures"] == ["Qwen3DSparkModel"]
    assert config["markov_head_type"] == "rnn"

    loaded = load_draft(tmp_path)
    assert loaded.fc.weight.dtype == torch.bfloat16
    reference = copy.deepcopy(draft).to(torch.bfloat16)
    for original, restored in zip(outputs(reference), outputs(loaded), strict=False):
        assert torch.equal(original, restored)


def test_resave_removes_stale_shards(tmp_path):
    draft = tiny_draft()
    save_draft(draft, tmp_path, max_shard_size=4000)
    save_draft(draft, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", WEIGHTS_NAME]
    assert torch.equal(load_draft(tmp_path).fc.weight, draft.fc.weight)


def test_load_names_missing_and_extra_tensors(tmp_path):
    draft = tiny_draft()
    save_draft(draft, tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    del tensors["layers.1.mlp.up_proj.weight"]
    tensors["markov_head.gate_proj.weight"] = torch.zeros(4, HIDDEN + 4)
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError) as error:
        load_draft(tmp_path)
    assert "missing tensors ['layers.1.mlp.up_proj.weight']" in str(error.value)
    assert "unexpected tensors ['markov_head.gate_proj.weight']" in str(error.value)


def test_load_names_wrong_shape(tmp_path):
    save_draft(tiny_draft(), tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    tensors["fc.weight"] = torch.zeros(HIDDEN, 3 * HIDDEN)
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=r"fc.weight \(16, 48\) \(expected \(16, 32\)\)"):
        load_draft(tmp_path)


def test_load_rejects_other_architectures(tmp_path):
    save_draft(tiny_draft(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["Qwen3Eagle3Model"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="Qwen3Eagle3Model"):
        load_draft(tmp_path)


def test_load_reports_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_draft(tmp_path)
    save_draft(tiny_draft(), tmp_path, max_shard_size=4000)
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-"):
        load_draft(tmp_path)
    for path in tmp_path.glob("model*"):
        path.unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_draft(tmp_path)


def test_parse_shard_size():
    assert parse_shard_size(123) == 123
    assert parse_shard_size("2GB") == 2 * 10**9
    assert parse_shard_size("1GiB") == 2**30
    assert parse_shard_size("500kb") == 500_000
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_shard_size("lots")


def test_check_matches_target():
    draft = tiny_draft()
    check_draft_matches_target(draft.config, tiny_target().config, layer_ids=[0, 2])
    with pytest.raises(ValueError, match="vocab_size: draft 64 != target 128"):
        check_draft_matches_target(draft.config, tiny_target(vocab_size=128).config)
    with pytest.raises(ValueError, match="hidden_size: draft 16 != target 32"):
        check_draft_matches_target(draft.config, tiny_target(hidden_size=32, head_dim=8).config)
    with pytest.raises(
        ValueError, match=r"num_target_layers: draft 4 != target num_hidden_layers 3.*\[2\] are invalid"
    ):
        check_draft_matches_target(draft.config, tiny_target(num_hidden_layers=3).config)
    with pytest.raises(ValueError, match=r"target_layer_ids: draft \[0, 2\] != cached layer ids \[1, 2\]"):
        check_draft_matches_target(draft.config, tiny_target().config, layer_ids=[1, 2])
