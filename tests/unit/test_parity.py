"""Numerical parity with DeepSpec on the reference fixtures (float32, CPU).

Every case folder under ``$DEEPSPEC_PARITY_DIR`` (default: ``shared/fixtures/parity``
beside the repository) whose draft is a DSpark/DFlash model (Qwen3 or Gemma4
target) is checked: training forward, loss, components, metrics, gradients,
drafting with a KV cache, and the checkpoint layout. Eagle3 cases are checked
by ``test_parity_eagle3.py``; a case of any other architecture fails the
listing test, and finding no DSpark/DFlash case fails.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, Qwen3Config, Qwen3ForCausalLM
from transformers.models.gemma4 import Gemma4Config, Gemma4ForConditionalGeneration

from deepspec.drafts.checkpoint import draft_config_dict, load_draft, save_draft
from deepspec.drafts.dspark import ARCHITECTURE, DSparkConfig, Qwen3DSparkModel, build_draft
from deepspec.drafts.dspark_backbone import DSparkForwardOutput, DSparkModelBase
from deepspec.drafts.dspark_drafter import DSparkDrafter, proposal_length, sample_block
from deepspec.drafts.dspark_gemma4 import GEMMA4_ARCHITECTURE, Gemma4DSparkConfig, Gemma4DSparkModel
from deepspec.drafts.losses import DSparkLossOutput, dspark_loss

DEFAULT_PARITY_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "parity"
PARITY_DIR = Path(os.environ.get("DEEPSPEC_PARITY_DIR", DEFAULT_PARITY_DIR))

# Tolerances recommended by every case README (float32 on CPU).
SCALAR_TOL = 2e-5  # |delta| <= SCALAR_TOL * max(1, |x|) for loss, components and metrics
GRAD_NORM_REL_TOL = 1e-4
GRAD_TOL = 1e-4  # max |delta| <= GRAD_TOL * max |g_ref| per tensor
TENSOR_ABS_TOL = 1e-4  # logits, probabilities, hidden states, confidence logits

# The DSpark/DFlash architectures checked here, by (architecture, draft model_type).
MODEL_CLASSES: dict[tuple[str, str], tuple[type[PreTrainedModel], type[DSparkModelBase]]] = {
    (ARCHITECTURE, "qwen3"): (DSparkConfig, Qwen3DSparkModel),
    (GEMMA4_ARCHITECTURE, "gemma4_text"): (Gemma4DSparkConfig, Gemma4DSparkModel),
}
# Architectures whose cases another test file checks.
CHECKED_ELSEWHERE_SUFFIX = "Eagle3Model"


def case_architecture(folder: Path) -> tuple[str, str]:
    config = json.loads((folder / "draft_config.json").read_text(encoding="utf-8"))
    return (config.get("architectures") or ["<none>"])[0], config.get("model_type", "<none>")


def discover_cases() -> tuple[list[str], dict[str, str]]:
    supported: list[str] = []
    unsupported: dict[str, str] = {}
    if not PARITY_DIR.is_dir():
        return supported, unsupported
    for folder in sorted(path for path in PARITY_DIR.iterdir() if (path / "draft_config.json").is_file()):
        architecture, model_type = case_architecture(folder)
        if (architecture, model_type) in MODEL_CLASSES:
            supported.append(folder.name)
        else:
            unsupported[folder.name] = architecture
    return supported, unsupported


SUPPORTED_CASES, UNSUPPORTED_CASES = discover_cases()
NO_CASE = "<no DSpark/DFlash case found>"


@dataclass
class Case:
    name: str
    folder: Path
    config: dict[str, Any]
    expected: dict[str, Any]
    inputs: dict[str, torch.Tensor]
    tensors: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]

    @property
    def model_args(self) -> dict[str, Any]:
        return self.config["model_args (DeepSpec config `model` dict)"]

    @property
    def loss_args(self) -> dict[str, Any]:
        return self.config["loss_args"]


@cache
def load_case(name: str) -> Case:
    if name == NO_CASE:
        pytest.fail(f"no DSpark/DFlash parity case in {PARITY_DIR}; set DEEPSPEC_PARITY_DIR to the fixture folder")
    folder = PARITY_DIR / name
    weights = load_file(folder / "weights.safetensors")
    return Case(
        name=name,
        folder=folder,
        config=json.loads((folder / "config.json").read_text(encoding="utf-8")),
        expected=json.loads((folder / "expected.json").read_text(encoding="utf-8")),
        inputs=load_file(folder / "inputs.safetensors"),
        tensors=load_file(folder / "expected_tensors.safetensors"),
        weights={key: value for key, value in weights.items() if not key.startswith("target.")},
    )


def build_model(case: Case) -> DSparkModelBase:
    config_class, model_class = MODEL_CLASSES[case_architecture(case.folder)]
    config = config_class.from_json_file(str(case.folder / "draft_config.json"))
    model = model_class(config).float()
    model.load_state_dict(case.weights, strict=True)
    return model


def build_target(case: Case) -> PreTrainedModel:
    """Build the case's tiny target (random weights) from its config, as the reference's draft builder saw it."""
    values = case.config["target_config (tiny; the draft config copies it)"]
    if values["model_type"] == "gemma4":
        return Gemma4ForConditionalGeneration(Gemma4Config.from_dict(values))
    return Qwen3ForCausalLM(Qwen3Config.from_dict(values))


def run_forward(case: Case, model: DSparkModelBase) -> DSparkForwardOutput:
    inputs = case.inputs
    return model.forward_train(
        input_ids=inputs["input_ids"],
        target_hidden_states=inputs["target_hidden_states"],
        loss_mask=inputs["loss_mask"],
        target_last_hidden_states=inputs["target_last_hidden_states"],
        anchor_positions=inputs["anchor_positions"],
        block_keep_mask=inputs["block_keep_mask"],
    )


def run_loss(case: Case, output: DSparkForwardOutput) -> DSparkLossOutput:
    return dspark_loss(
        output,
        ce_alpha=case.loss_args["ce_loss_alpha"],
        l1_alpha=case.loss_args["l1_loss_alpha"],
        confidence_alpha=case.model_args.get("confidence_head_alpha", 0.0),
        loss_decay_gamma=case.loss_args["loss_decay_gamma"],
    )


def assert_scalar_close(name: str, actual: float, expected: float) -> None:
    assert abs(actual - expected) <= SCALAR_TOL * max(1.0, abs(expected)), f"{name}: {actual} != {expected}"


def assert_tensor_close(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.detach().float() - expected.float()).abs().max().item()
    assert diff <= TENSOR_ABS_TOL, f"{name}: max abs diff {diff:.3e} > {TENSOR_ABS_TOL}"


CASES = SUPPORTED_CASES or [NO_CASE]


def test_parity_cases_found():
    assert SUPPORTED_CASES, f"no DSpark/DFlash parity case in {PARITY_DIR}"


def test_unsupported_cases_listed():
    unknown = {name: arch for name, arch in UNSUPPORTED_CASES.items() if not arch.endswith(CHECKED_ELSEWHERE_SUFFIX)}
    assert not unknown, f"parity cases with an architecture no parity test checks: {unknown}"


def test_both_target_families_have_cases():
    families = {case_architecture(PARITY_DIR / name)[1] for name in SUPPORTED_CASES}
    assert families == {"qwen3", "gemma4_text"}, f"DSpark/DFlash parity cases cover only {sorted(families)}"


@pytest.mark.parametrize("name", CASES)
def test_training_forward_matches(name):
    case = load_case(name)
    model = build_model(case)
    output = run_forward(case, model)
    assert torch.equal(output.target_ids, case.tensors["target_ids"])
    assert torch.equal(output.eval_mask, case.tensors["eval_mask"])
    assert_tensor_close("draft_logits", output.draft_logits, case.tensors["draft_logits"])
    assert_tensor_close("aligned_target_logits", output.aligned_target_logits, case.tensors["aligned_target_logits"])
    if "rope_inv_freq" in case.tensors:
        assert_tensor_close("rope_inv_freq", model.rotary_emb.inv_freq, case.tensors["rope_inv_freq"])
    if "confidence_pred" in case.tensors:
        assert_tensor_close("confidence_pred", output.confidence_pred, case.tensors["confidence_pred"])
    else:
        assert output.confidence_pred is None


@pytest.mark.parametrize("name", CASES)
def test_loss_components_and_metrics_match(name):
    case = load_case(name)
    result = run_loss(case, run_forward(case, build_model(case)))
    assert_scalar_close("loss", result.loss.item(), case.expected["loss"])
    assert result.num_supervised == case.expected["num_supervised_slots"]
    for key, value in case.expected["components"].items():
        assert key in result.components, f"component {key} missing"
        assert_scalar_close(key, result.components[key].item(), value)
    for key, value in case.expected["metrics_logged_by_reference"].items():
        short = key.removeprefix("train/")
        assert short in result.metrics, f"metric {short} missing"
        assert_scalar_close(short, result.metrics[short].item(), value)


@pytest.mark.parametrize("name", CASES)
def test_gradients_match(name):
    case = load_case(name)
    model = build_model(case)
    run_loss(case, run_forward(case, model)).loss.backward()
    trainable = {key: parameter for key, parameter in model.named_parameters() if parameter.requires_grad}
    assert sorted(trainable) == sorted(case.expected["grad_norms"])
    for key in ("embed_tokens.weight", "lm_head.weight"):
        assert model.get_parameter(key).grad is None, f"{key} is frozen but received a gradient"
    for key, parameter in trainable.items():
        expected_norm = case.expected["grad_norms"][key]
        relative = abs(parameter.grad.norm().item() - expected_norm) / max(expected_norm, 1e-12)
        assert relative <= GRAD_NORM_REL_TOL, f"grad norm of {key}: relative error {relative:.3e}"
    total = torch.stack([p.grad.norm() for p in trainable.values()]).norm().item()
    assert_scalar_close("total_grad_norm", total, case.expected["total_grad_norm"])
    for key in case.expected["gradients_saved_in_expected_tensors"]:
        reference = case.tensors[f"grad.{key}"]
        diff = (trainable[key].grad - reference).abs().max().item()
        assert diff <= GRAD_TOL * reference.abs().max().item(), f"gradient of {key}: max abs diff {diff:.3e}"


@pytest.mark.parametrize("name", CASES)
def test_drafting_matches(name):
    case = load_case(name)
    model = build_model(case).eval()
    drafter = DSparkDrafter(model)
    for round_info in case.expected["drafting"]["rounds"]:
        prefix = f"draft_r{round_info['round']}_"
        drafter.extend_context(case.inputs[prefix + "context_features"][0])
        assert drafter.context_length == round_info["draft_cache_len_after_crop"]
        block_ids = case.inputs[prefix + "block_input_ids"][0]
        positions = case.inputs[prefix + "block_position_ids"][0]
        anchor, start = int(block_ids[0]), int(positions[0])
        assert anchor == round_info["anchor_token_id"] and start == round_info["context_rows_fed_this_round"][1]

        hidden = drafter.block_hidden(anchor, start)
        assert_tensor_close(prefix + "block_hidden", hidden, case.tensors[prefix + "block_hidden"][0])
        assert_tensor_close(prefix + "base_logits", model.base_logits(hidden), case.tensors[prefix + "base_logits"][0])

        proposal = drafter.propose(anchor, start, 0.0, None)
        assert proposal.tokens.tolist() == round_info["greedy_tokens"]
        assert torch.equal(proposal.probs.argmax(dim=-1), proposal.tokens)
        assert torch.all(proposal.probs.sum(dim=-1) == 1.0)
        greedy = sample_block(model, hidden, anchor, 0.0)
        assert_tensor_close(
            prefix + "greedy_corrected", greedy.corrected_logits, case.tensors[prefix + "greedy_corrected_logits"][0]
        )

        sampled = sample_block(model, hidden, anchor, 1.0, forced_tokens=case.inputs[prefix + "t1_tokens"][0])
        assert sampled.tokens.tolist() == round_info["t1_tokens"]
        assert_tensor_close(
            prefix + "t1_corrected", sampled.corrected_logits, case.tensors[prefix + "t1_corrected_logits"][0]
        )
        assert_tensor_close(prefix + "t1_draft_probs", sampled.probs, case.tensors[prefix + "t1_draft_probs"][0])

        for mode, block in (("greedy", greedy), ("t1", sampled)):
            if prefix + f"{mode}_confidence_logits" not in case.tensors:
                assert block.confidence_logits is None
                continue
            assert_tensor_close(
                prefix + f"{mode}_confidence",
                block.confidence_logits,
                case.tensors[prefix + f"{mode}_confidence_logits"][0],
            )
            lengths = {
                threshold: proposal_length(block.confidence_logits, float(threshold), model.block_size)
                for threshold in round_info[f"{mode}_proposal_len_by_threshold"]
            }
            assert lengths == round_info[f"{mode}_proposal_len_by_threshold"]


@pytest.mark.parametrize("name", CASES)
def test_propose_samples_from_its_probs(name):
    case = load_case(name)
    model = build_model(case).eval()
    drafter = DSparkDrafter(model)
    round_info = case.expected["drafting"]["rounds"][0]
    drafter.extend_context(case.inputs["draft_r0_context_features"][0])
    anchor, start = round_info["anchor_token_id"], round_info["start"]
    first = drafter.propose(anchor, start, 1.0, torch.Generator().manual_seed(7))
    again = drafter.propose(anchor, start, 1.0, torch.Generator().manual_seed(7))
    assert torch.equal(first.tokens, again.tokens)
    assert drafter.context_length == start, "proposing must not cache the block"
    hidden = drafter.block_hidden(anchor, start)
    replay = sample_block(model, hidden, anchor, 1.0, forced_tokens=first.tokens)
    assert torch.allclose(first.probs, replay.probs)
    assert torch.all(first.probs.gather(1, first.tokens[:, None]) > 0)


@pytest.mark.parametrize("name", CASES)
def test_reference_checkpoint_loads(name, tmp_path):
    case = load_case(name)
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    shutil.copy(case.folder / "draft_config.json", reference_dir / "config.json")
    save_file(case.weights, reference_dir / "model.safetensors", metadata={"format": "pt"})
    model = load_draft(reference_dir)
    for key, value in case.weights.items():
        assert torch.equal(model.state_dict()[key], value), key

    save_draft(model, tmp_path / "ours")
    ours = json.loads((tmp_path / "ours" / "config.json").read_text(encoding="utf-8"))
    reference = json.loads((case.folder / "draft_config.json").read_text(encoding="utf-8"))
    ours.pop("transformers_version")
    reference.pop("transformers_version")
    assert ours == reference
    assert sorted(load_file(tmp_path / "ours" / "model.safetensors")) == sorted(case.weights)


@pytest.mark.parametrize("name", CASES)
def test_build_draft_reproduces_reference_config(name):
    case = load_case(name)
    args = case.model_args
    draft = build_draft(
        build_target(case),
        layer_ids=args["target_layer_ids"],
        block_size=args["block_size"],
        num_layers=args["num_draft_layers"],
        num_anchors=args["num_anchors"],
        markov_rank=args["markov_rank"],
        markov_head_type=args.get("markov_head_type"),
        enable_confidence_head=args["confidence_head_alpha"] > 0,
        confidence_head_with_markov=args.get("confidence_head_with_markov"),
        mask_token_id=args["mask_token_id"],
        seed=0,
    )
    ours = draft_config_dict(draft.config, torch.float32)
    reference = json.loads((case.folder / "draft_config.json").read_text(encoding="utf-8"))
    ours.pop("transformers_version")
    reference.pop("transformers_version")
    if not reference.get("attention_k_eq_v", True):
        # This transformers version drops num_global_key_value_heads from a target config without
        # attention_k_eq_v, and the draft never reads it then.
        assert ours.pop("num_global_key_value_heads") is None
        reference.pop("num_global_key_value_heads")
    assert ours == reference
    assert sorted(draft.state_dict()) == sorted(case.weights)
    assert type(draft) is MODEL_CLASSES[case_architecture(case.folder)][1]
