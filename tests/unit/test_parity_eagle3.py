"""Numerical parity of the Eagle3 drafts with DeepSpec on the reference fixtures (float32, CPU).

Every case folder under ``$DEEPSPEC_PARITY_DIR`` (default: ``shared/fixtures/parity``
beside the repository) whose draft architecture ends with ``Eagle3Model`` is
checked: weights load by the reference tensor names, the TTT unroll's
intermediate tensors, the loss, its components and metrics, the gradients,
the first drafting step, and the checkpoint layout. Finding no such case fails.
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
from transformers import Gemma4Config, Gemma4ForConditionalGeneration, PreTrainedModel, Qwen3Config, Qwen3ForCausalLM

from deepspec.drafts.checkpoint import draft_config_dict, load_draft, save_draft
from deepspec.drafts.eagle3 import (
    FROZEN_PARAMETERS,
    Eagle3ForwardOutput,
    Eagle3Model,
    build_eagle3_draft,
    eagle3_model_class,
)
from deepspec.drafts.eagle3_drafter import Eagle3Drafter
from deepspec.drafts.eagle3_loss import Eagle3LossOutput, eagle3_loss

DEFAULT_PARITY_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "parity"
PARITY_DIR = Path(os.environ.get("DEEPSPEC_PARITY_DIR", DEFAULT_PARITY_DIR))

# Tolerances recommended by every case README (float32 on CPU).
SCALAR_TOL = 2e-5  # |delta| <= SCALAR_TOL * max(1, |x|) for loss, components and metrics
GRAD_NORM_REL_TOL = 1e-4
GRAD_TOL = 1e-4  # max |delta| <= GRAD_TOL * max |g_ref| per tensor
TENSOR_ABS_TOL = 1e-4  # logits and hidden states
METRIC_PREFIX = "train/"


def case_architecture(folder: Path) -> str:
    config = json.loads((folder / "draft_config.json").read_text(encoding="utf-8"))
    return (config.get("architectures") or ["<none>"])[0]


def discover_cases() -> list[str]:
    if not PARITY_DIR.is_dir():
        return []
    folders = sorted(path for path in PARITY_DIR.iterdir() if (path / "draft_config.json").is_file())
    return [folder.name for folder in folders if case_architecture(folder).endswith("Eagle3Model")]


EAGLE3_CASES = discover_cases()
NO_CASE = "<no Eagle3 case found>"
CASES = EAGLE3_CASES or [NO_CASE]


@dataclass
class Case:
    name: str
    folder: Path
    config: dict[str, Any]
    draft_config: dict[str, Any]
    expected: dict[str, Any]
    inputs: dict[str, torch.Tensor]
    tensors: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]

    @property
    def model_args(self) -> dict[str, Any]:
        return self.config["model_args (DeepSpec config `model` dict)"]

    @property
    def steps(self) -> int:
        return int(self.model_args["ttt_length"])


@cache
def load_case(name: str) -> Case:
    if name == NO_CASE:
        pytest.fail(f"no Eagle3 parity case in {PARITY_DIR}; set DEEPSPEC_PARITY_DIR to the fixture folder")
    folder = PARITY_DIR / name
    weights = load_file(folder / "weights.safetensors")
    return Case(
        name=name,
        folder=folder,
        config=json.loads((folder / "config.json").read_text(encoding="utf-8")),
        draft_config=json.loads((folder / "draft_config.json").read_text(encoding="utf-8")),
        expected=json.loads((folder / "expected.json").read_text(encoding="utf-8")),
        inputs=load_file(folder / "inputs.safetensors"),
        tensors=load_file(folder / "expected_tensors.safetensors"),
        weights={key: value for key, value in weights.items() if not key.startswith("target.")},
    )


def build_model(case: Case) -> Eagle3Model:
    model_class = eagle3_model_class(case_architecture(case.folder))
    config = model_class.config_class.from_json_file(str(case.folder / "draft_config.json"))
    model = model_class(config).float()
    model.load_state_dict(case.weights, strict=True)
    return model


def build_target(case: Case) -> PreTrainedModel:
    """Build the case's tiny target (random weights) from its config, named as the reference's target was."""
    values = case.config["target_config (tiny; the draft config copies it)"]
    if values["model_type"] == "gemma4":
        target: PreTrainedModel = Gemma4ForConditionalGeneration(Gemma4Config.from_dict(values))
    else:
        target = Qwen3ForCausalLM(Qwen3Config.from_dict(values))
    target.config._name_or_path = case.draft_config["target_model_name_or_path"]
    return target


def run_forward(case: Case, model: Eagle3Model) -> Eagle3ForwardOutput:
    inputs = case.inputs
    return model.forward_train(
        input_ids=inputs["input_ids"],
        target_hidden_states=inputs["target_hidden_states"],
        loss_mask=inputs["loss_mask"],
        attention_mask=inputs["attention_mask"],
        target_last_hidden_states=inputs["target_last_hidden_states"],
    )


def run_loss(case: Case, output: Eagle3ForwardOutput) -> Eagle3LossOutput:
    return eagle3_loss(output, step_loss_decay=case.model_args["step_loss_decay"])


def assert_scalar_close(name: str, actual: float, expected: float) -> None:
    assert abs(actual - expected) <= SCALAR_TOL * max(1.0, abs(expected)), f"{name}: {actual} != {expected}"


def assert_tensor_close(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.detach().float() - expected.float()).abs().max().item()
    assert diff <= TENSOR_ABS_TOL, f"{name}: max abs diff {diff:.3e} > {TENSOR_ABS_TOL}"


def test_eagle3_cases_found():
    assert EAGLE3_CASES, f"no Eagle3 parity case in {PARITY_DIR}"


def test_both_target_families_have_cases():
    families = {load_case(name).draft_config["model_type"] for name in EAGLE3_CASES}
    assert families == {"qwen3", "gemma4_text"}, f"Eagle3 parity cases cover only {sorted(families)}"


@pytest.mark.parametrize("name", CASES)
def test_weights_load_by_reference_names(name):
    case = load_case(name)
    model_class = eagle3_model_class(case_architecture(case.folder))
    model = model_class(model_class.config_class.from_json_file(str(case.folder / "draft_config.json")))
    result = model.load_state_dict(case.weights, strict=False)
    assert result.missing_keys == []
    assert result.unexpected_keys == []
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen == sorted(FROZEN_PARAMETERS)


@pytest.mark.parametrize("name", CASES)
def test_rope_frequencies_match(name):
    case = load_case(name)
    model = build_model(case)
    assert_tensor_close("rope_inv_freq", model.rotary_emb.inv_freq, case.tensors["rope_inv_freq"])


@pytest.mark.parametrize("name", CASES)
def test_ttt_intermediates_match(name):
    case = load_case(name)
    with torch.no_grad():
        output = run_forward(case, build_model(case))
    assert len(output.draft_logits) == case.steps
    for step in range(case.steps):
        mask = output.position_masks[step]
        assert torch.equal(mask, case.tensors[f"step{step}_position_mask"].to(mask.dtype)), f"step {step} mask"
        assert_tensor_close(
            f"step{step}_output_hidden", output.output_hidden[step], case.tensors[f"step{step}_output_hidden"]
        )
        assert_tensor_close(
            f"step{step}_draft_logits", output.draft_logits[step], case.tensors[f"step{step}_draft_logits"]
        )


@pytest.mark.parametrize("name", CASES)
def test_loss_components_and_metrics_match(name):
    case = load_case(name)
    with torch.no_grad():
        loss = run_loss(case, run_forward(case, build_model(case)))
    assert_scalar_close("loss", float(loss.loss), case.expected["loss"])
    for component, value in case.expected["components"].items():
        assert_scalar_close(component, float(loss.components[component]), value)
    for metric, value in case.expected["metrics_logged_by_reference"].items():
        assert_scalar_close(metric, float(loss.metrics[metric.removeprefix(METRIC_PREFIX)]), value)
    assert case.expected["loss_normalizer_per_step"] == case.inputs["input_ids"].numel()


@pytest.mark.parametrize("name", CASES)
def test_gradients_match(name):
    case = load_case(name)
    model = build_model(case)
    run_loss(case, run_forward(case, model)).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(grads) == sorted(case.expected["grad_norms"])
    for frozen in FROZEN_PARAMETERS:
        assert model.get_parameter(frozen).grad is None, frozen
    total = torch.sqrt(sum(grad.double().pow(2).sum() for grad in grads.values()))
    expected_total = case.expected["total_grad_norm"]
    assert abs(float(total) - expected_total) <= GRAD_NORM_REL_TOL * expected_total
    for param, expected_norm in case.expected["grad_norms"].items():
        norm = float(grads[param].norm())
        assert abs(norm - expected_norm) <= GRAD_NORM_REL_TOL * expected_norm, f"{param}: {norm} != {expected_norm}"
    saved = [key.removeprefix("grad.") for key in case.tensors if key.startswith("grad.")]
    assert sorted(saved) == sorted(grads)
    for param in saved:
        reference = case.tensors[f"grad.{param}"]
        diff = (grads[param] - reference).abs().max().item()
        assert diff <= GRAD_TOL * reference.abs().max().item(), f"grad.{param}: max abs diff {diff:.3e}"


@pytest.mark.parametrize("name", CASES)
def test_first_draft_matches_step0_logits(name):
    case = load_case(name)
    model = build_model(case).eval()
    lengths = case.inputs["attention_mask"].sum(dim=1)
    for row in range(lengths.shape[0]):
        anchor_position = int(lengths[row]) - 2
        ids = case.inputs["input_ids"][row].tolist()
        drafter = Eagle3Drafter(model, prompt_ids=ids[:anchor_position])
        drafter.extend_context(case.inputs["target_hidden_states"][row, :anchor_position])
        proposal = drafter.propose(ids[anchor_position], anchor_position, 1.0, torch.Generator().manual_seed(0))
        # Step 0 at position t pairs (f_t, x_{t+1}), so the anchor's pair sits at t = anchor_position - 1.
        reference = case.tensors["step0_draft_logits"][row, anchor_position - 1]
        assert_tensor_close("first draft probs", proposal.probs[0], torch.softmax(reference, dim=-1))
        assert proposal.tokens.shape == (case.steps,)


@pytest.mark.parametrize("name", CASES)
def test_reference_checkpoint_loads(name, tmp_path):
    case = load_case(name)
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    shutil.copy(case.folder / "draft_config.json", reference_dir / "config.json")
    save_file(case.weights, reference_dir / "model.safetensors", metadata={"format": "pt"})
    model = load_draft(reference_dir)
    assert type(model) is eagle3_model_class(case_architecture(case.folder))
    for key, value in case.weights.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert sorted(n for n, p in model.named_parameters() if not p.requires_grad) == sorted(FROZEN_PARAMETERS)

    save_draft(model, tmp_path / "ours")
    ours = json.loads((tmp_path / "ours" / "config.json").read_text(encoding="utf-8"))
    reference = dict(case.draft_config)
    ours.pop("transformers_version")
    reference.pop("transformers_version")
    assert ours == reference
    assert sorted(load_file(tmp_path / "ours" / "model.safetensors")) == sorted(case.weights)


@pytest.mark.parametrize("name", CASES)
def test_build_reproduces_reference_config(name):
    case = load_case(name)
    args = case.model_args
    draft = build_eagle3_draft(
        build_target(case),
        layer_ids=args["target_layer_ids"],
        num_layers=args["draft_num_hidden_layers"],
        ttt_length=args["ttt_length"],
        step_loss_decay=args["step_loss_decay"],
        seed=0,
    )
    ours = draft_config_dict(draft.config, torch.float32)
    reference = dict(case.draft_config)
    ours.pop("transformers_version")
    reference.pop("transformers_version")
    if not reference.get("attention_k_eq_v", True):
        # This transformers version drops num_global_key_value_heads from a target config without
        # attention_k_eq_v, and the draft never reads it then.
        assert ours.pop("num_global_key_value_heads", None) is None
        reference.pop("num_global_key_value_heads")
    assert ours == reference
    assert sorted(draft.state_dict()) == sorted(case.weights)
    assert type(draft) is eagle3_model_class(case_architecture(case.folder))
