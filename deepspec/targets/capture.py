"""Capture a target's hidden states with forward hooks, without running its LM head.

Two tensors come out of one backbone forward pass:

- ``target_hidden`` [B, T, L*H]: the raw outputs of the decoder layers in
  ``layer_ids`` (the residual stream before the final norm), concatenated on the
  feature axis in ``layer_ids`` order. Layer id ``-1`` is the embedding output.
- ``last_hidden`` [B, T, H]: the output of the final norm, i.e. the hidden state
  the LM head would read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from deepspec.targets.loading import decoder_layers, final_norm, hidden_size


def _backbone(model: nn.Module) -> nn.Module:
    """Return the module that maps input ids to the final normed hidden state (no LM head)."""
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        decoder = get_decoder()
        if isinstance(decoder, nn.Module):
            return decoder
    return model


def _first_tensor(output: Any) -> torch.Tensor:
    # transformers 5 decoder layers return a plain Tensor; older versions and
    # some architectures return a tuple whose first element is the hidden state.
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find a hidden-state tensor in a module output of type {type(output).__name__}")


def capture_hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layer_ids: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the target backbone once and return ``(target_hidden [B,T,L*H], last_hidden [B,T,H])``.

    ``layer_ids`` index the decoder layers (``-1`` is the embedding output).
    Hooks are removed even when the forward pass raises. The caller chooses the
    grad mode; wrap the call in ``torch.inference_mode()`` for caching.
    """
    if not layer_ids:
        raise ValueError("layer_ids is empty; list at least one target layer to capture")
    layers = decoder_layers(model)
    for layer_id in layer_ids:
        if not -1 <= layer_id < len(layers):
            raise ValueError(
                f"layer id {layer_id} is out of range for a target with {len(layers)} decoder layers; "
                f"use -1 (embedding output) or 0..{len(layers) - 1}"
            )
    captured: dict[int, torch.Tensor] = {}
    normed: list[torch.Tensor] = []

    def keep_layer(layer_id: int) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured[layer_id] = _first_tensor(output).detach()

        return hook

    def keep_norm(_module: nn.Module, _inputs: Any, output: Any) -> None:
        normed.append(_first_tensor(output).detach())

    handles = []
    try:
        for layer_id in dict.fromkeys(layer_ids):
            module = model.get_input_embeddings() if layer_id == -1 else layers[layer_id]
            handles.append(module.register_forward_hook(keep_layer(layer_id)))
        handles.append(final_norm(model).register_forward_hook(keep_norm))
        _backbone(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()

    missing = [layer_id for layer_id in layer_ids if layer_id not in captured]
    if missing or len(normed) != 1:
        raise RuntimeError(
            f"the forward pass of {type(model).__name__} did not run the hooked modules as expected (layers "
            f"without output: {missing}, final-norm calls: {len(normed)}); this target architecture needs its "
            "own capture rule"
        )
    config = getattr(model, "config", None)
    if config is not None:
        width = hidden_size(config)
        wrong = {
            layer_id: captured[layer_id].shape[-1] for layer_id in layer_ids if captured[layer_id].shape[-1] != width
        }
        if wrong or normed[0].shape[-1] != width:
            raise RuntimeError(
                f"captured hidden states of {type(model).__name__} do not have the config's hidden size {width} "
                f"(layer widths {wrong}, final norm {normed[0].shape[-1]}); this target architecture needs its own "
                "capture rule"
            )
    target_hidden = torch.cat([captured[layer_id] for layer_id in layer_ids], dim=-1)
    return target_hidden, normed[0]
