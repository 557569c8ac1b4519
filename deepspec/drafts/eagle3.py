"""Eagle3 draft models for Qwen3 and Gemma4 targets, trained with a training-time-test (TTT) unroll.

The draft is one (or a few) decoder layers whose attention input is the
concatenation ``[input_layernorm(embed(x)) ; hidden_norm(h)]`` of a token
embedding and a hidden stream ``h`` (width 2H). At the first step ``h`` is
``fc`` of the concatenated target layer outputs; later steps feed back the
draft's own pre-norm output. The residual of each layer is the incoming
hidden stream. Logits are ``lm_head(norm(h))``, soft-capped for Gemma4.

Training unrolls ``ttt_length`` steps over a whole sequence. Position ``t``
contains token ``x_{t+k+1}`` at step ``k`` and predicts ``x_{t+k+2}``; its keys
are rotated at position ``t+k`` and appended to a per-step cache. A query at
step ``k`` attends causally to the step-0 keys and, in every later step's
block, only to its own slot.

Module and tensor names follow DeepSpec's ``Qwen3Eagle3Model`` and
``Gemma4Eagle3Model`` checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import Gemma4TextConfig, PreTrainedModel, Qwen3Config
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextScaledWordEmbedding
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from deepspec.config.schema import DraftConfig
from deepspec.drafts.dspark import DSparkRotaryEmbedding, validate_target_layer_ids
from deepspec.drafts.dspark_gemma4 import ReferenceLayoutMixin
from deepspec.drafts.eagle3_layers import Gemma4Eagle3DecoderLayer, KeyValue, Qwen3Eagle3DecoderLayer
from deepspec.drafts.from_target import instantiate_from_target
from deepspec.drafts.gemma4_layers import (
    Gemma4RMSNorm,
    Gemma4RotaryEmbedding,
    global_attention_sizes,
    layer_shape,
    soft_cap,
)

QWEN3_ARCHITECTURE = "Qwen3Eagle3Model"
GEMMA4_ARCHITECTURE = "Gemma4Eagle3Model"
EAGLE3_ARCHITECTURES = (QWEN3_ARCHITECTURE, GEMMA4_ARCHITECTURE)
FROZEN_PARAMETERS = ("embed_tokens.weight", "lm_head.weight")


@strict
class Eagle3Config(Qwen3Config):
    """A copy of the target's Qwen3 config plus the Eagle3 fields (as in DeepSpec's ``config.json``)."""

    num_target_layers: int | None = None
    target_layer_ids: list[int] | None = None
    target_model_name_or_path: str | None = None
    ttt_length: int = 7
    step_loss_decay: float = 0.8
    draft_num_hidden_layers: int = 1


@strict
class Gemma4Eagle3Config(ReferenceLayoutMixin, Gemma4TextConfig):
    """A copy of the target's Gemma4 text config plus the Eagle3 fields."""

    num_target_layers: int | None = None
    target_layer_ids: list[int] | None = None
    target_model_name_or_path: str | None = None
    ttt_length: int = 7
    step_loss_decay: float = 0.8
    draft_num_hidden_layers: int = 1
    target_model_type: str | None = None
    target_text_model_type: str | None = None
    # Gemma4TextConfig turns these two into per_layer_config; they are kept so that
    # config.json has DeepSpec's flat layout.
    global_head_dim: int = 512
    num_global_key_value_heads: int | None = None


AnyEagle3Config = Eagle3Config | Gemma4Eagle3Config


def validate_eagle3_config(config: AnyEagle3Config) -> None:
    """Check the Eagle3 fields, naming the field and the fix.

    NOTE: DeepSpec requires exactly 5 target layers in ``[0, num_layers - 1]``.
    Here any strictly increasing ids in ``[-1, num_layers - 2]`` are accepted,
    as for DSpark. This covers DeepSpec's released drafts (their ids never
    include the last layer) and tiny targets with fewer than 6 layers.
    """
    if config.target_layer_ids is None or config.num_target_layers is None:
        raise ValueError("draft config lacks target_layer_ids or num_target_layers; build it with build_eagle3_draft()")
    validate_target_layer_ids(list(config.target_layer_ids), config.num_target_layers)
    if config.ttt_length < 1:
        raise ValueError(f"ttt_length must be >= 1, got {config.ttt_length}")
    if not config.step_loss_decay > 0:
        raise ValueError(f"step_loss_decay must be > 0, got {config.step_loss_decay}")
    if config.num_hidden_layers < 1:
        raise ValueError(f"num_hidden_layers must be >= 1, got {config.num_hidden_layers}")
    if config.tie_word_embeddings:
        raise ValueError("tie_word_embeddings must be false: the draft stores embed_tokens and lm_head separately")


@dataclass
class Eagle3ForwardOutput:
    """Per-step outputs of the TTT unroll; every list has ``ttt_length`` entries."""

    draft_logits: list[torch.Tensor]  # [B, T, V] each
    target_probs: list[torch.Tensor]  # float32 [B, T, V] each: the target distribution each position predicts
    position_masks: list[torch.Tensor]  # float32 [B, T] each: 1 where the step's prediction is supervised
    output_hidden: list[torch.Tensor] = field(default_factory=list)  # pre-norm layer outputs [B, T, H]
    target_argmax: list[torch.Tensor] = field(default_factory=list)  # int64 [B, T]: argmax of target_probs
    seq_len: int = 0


def ttt_attention_mask(lengths: torch.Tensor, seq_len: int, step: int) -> torch.Tensor:
    """Return the bool mask ``[B, 1, T, (step+1)*T]`` of TTT step ``step`` (True = may attend).

    With ``l = max(length - step, 0)``, query ``q`` is valid iff ``q < l``. A
    valid query attends to the step-0 keys ``j <= q`` and, in each later step's
    block, only its own slot ``s*T + q``. Invalid queries attend to nothing.
    """
    device = lengths.device
    query = torch.arange(seq_len, device=device)
    valid_length = (lengths - step).clamp(min=0)
    valid_query = query[None, :] < valid_length[:, None]  # [B, T]
    causal = query[None, :] <= query[:, None]  # [T, T]
    diagonal = torch.eye(seq_len, dtype=torch.bool, device=device)
    blocks = torch.cat([causal] + [diagonal] * step, dim=1)  # [T, (step+1)*T]
    return (blocks[None] & valid_query[:, :, None])[:, None]


def shift_left(tensor: torch.Tensor, count: int, fill: float | int = 0) -> torch.Tensor:
    """Shift ``tensor [B, T, ...]`` left along dim 1 by ``count``, filling the tail with ``fill``."""
    if count <= 0:
        return tensor
    tail = torch.full_like(tensor[:, : min(count, tensor.shape[1])], fill)
    return torch.cat([tensor[:, count:], tail], dim=1)[:, : tensor.shape[1]]


def base_position_mask(loss_mask: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Return ``loss_mask`` as float32 with each sample's last real token zeroed (it has no next-token target)."""
    base = loss_mask.to(torch.float32).clone()
    lengths = attention_mask.sum(dim=1).long()
    rows = torch.nonzero(lengths > 0).flatten()
    base[rows, lengths[rows] - 1] = 0.0
    return base


class Eagle3Model(PreTrainedModel):
    """The parts shared by the Qwen3 and Gemma4 Eagle3 drafts; subclasses build the family's modules."""

    base_model_prefix = ""
    main_input_name = "input_ids"
    _supports_sdpa = True

    embed_tokens: nn.Embedding
    layers: nn.ModuleList
    norm: nn.Module
    fc: nn.Linear
    lm_head: nn.Linear

    def _freeze_shared(self) -> None:
        self.embed_tokens.weight.requires_grad_(False)
        self.lm_head.weight.requires_grad_(False)

    @property
    def ttt_length(self) -> int:
        return int(self.config.ttt_length)

    @property
    def logit_softcap(self) -> float | None:
        return None

    def rotary(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return RoPE ``cos, sin`` ``[B, Q, hd]`` for ``positions [B, Q]``."""
        raise NotImplementedError

    def softcap(self, logits: torch.Tensor) -> torch.Tensor:
        return soft_cap(logits, self.logit_softcap)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Return ``lm_head(norm(hidden))`` (soft-capped when the family caps logits)."""
        return self.softcap(self.lm_head(self.norm(hidden)))

    @torch.no_grad()
    def target_logits(self, target_last_hidden_states: torch.Tensor) -> torch.Tensor:
        """Return the target's logits from its post-norm last hidden state (frozen head, no gradient)."""
        return self.softcap(self.lm_head(target_last_hidden_states.to(self.lm_head.weight.dtype)))

    def project_features(self, target_hidden_states: torch.Tensor) -> torch.Tensor:
        """Map concatenated target layer outputs ``[..., L*H]`` to the hidden stream ``[..., H]``."""
        return self.fc(target_hidden_states.to(self.fc.weight.dtype))

    def step(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        past: list[KeyValue] | None,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, list[KeyValue]]:
        """Run the layers once over ``Q`` new slots and return the pre-norm output and the extended caches.

        ``input_ids`` and ``positions`` are ``[B, Q]``. ``hidden [B, Q, H]`` is
        the projected target features (``project_features``) or an earlier
        output. ``past`` contains each layer's cached keys/values (None: empty).
        ``mask`` is bool ``[B, 1, Q, P+Q]`` over the cached and new keys, or
        None to let every new slot attend to every key.
        """
        embeds = self.embed_tokens(input_ids)
        cos, sin = self.rotary(hidden, positions)
        caches: list[KeyValue] = []
        for index, layer in enumerate(self.layers):
            layer_past = past[index] if past is not None else None
            hidden, cache = layer(embeds, hidden, cos, sin, layer_past, mask)
            caches.append(cache)
        return hidden, caches

    def forward_train(
        self,
        input_ids: torch.Tensor,
        target_hidden_states: torch.Tensor,
        loss_mask: torch.Tensor,
        attention_mask: torch.Tensor,
        target_last_hidden_states: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> Eagle3ForwardOutput:
        """Unroll ``ttt_length`` training-time-test steps over a right-padded batch.

        ``input_ids``, ``loss_mask`` and ``attention_mask`` are ``[B, T]``;
        ``target_hidden_states`` is ``[B, T, L*H]`` (raw target layer outputs)
        and ``target_last_hidden_states`` ``[B, T, H]`` (post final norm).
        ``generator`` is unused: the unroll has no randomness.
        """
        del generator
        batch, seq_len = input_ids.shape
        config = self.config
        for name, tensor in (("loss_mask", loss_mask), ("attention_mask", attention_mask)):
            if tuple(tensor.shape) != (batch, seq_len):
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected input_ids' {(batch, seq_len)}")
        expected_features = len(config.target_layer_ids) * config.hidden_size
        if tuple(target_hidden_states.shape) != (batch, seq_len, expected_features):
            raise ValueError(
                f"target_hidden_states has shape {tuple(target_hidden_states.shape)}, expected "
                f"{(batch, seq_len, expected_features)} = [batch, seq_len, {len(config.target_layer_ids)} target "
                f"layers x hidden {config.hidden_size}]"
            )
        if tuple(target_last_hidden_states.shape) != (batch, seq_len, config.hidden_size):
            raise ValueError(
                f"target_last_hidden_states has shape {tuple(target_last_hidden_states.shape)}, expected "
                f"{(batch, seq_len, config.hidden_size)}"
            )
        steps = self.ttt_length
        lengths = attention_mask.sum(dim=1).long()

        # Row t of ``padded`` is the target's distribution for x_{t+2}; uniform rows pad the tail.
        probs = torch.softmax(self.target_logits(target_last_hidden_states).float(), dim=-1)
        uniform = torch.full_like(probs[:, :1], 1.0 / probs.shape[-1]).expand(-1, steps + 1, -1)
        padded = torch.cat([probs[:, 1:], uniform], dim=1)
        padded_argmax = padded.argmax(dim=-1)
        base_mask = base_position_mask(loss_mask, attention_mask)

        positions = torch.arange(seq_len, device=input_ids.device).expand(batch, seq_len)
        step_ids = shift_left(input_ids, 1)
        hidden = self.project_features(target_hidden_states)
        past: list[KeyValue] | None = None
        output = Eagle3ForwardOutput(draft_logits=[], target_probs=[], position_masks=[], seq_len=seq_len)
        for step in range(steps):
            # NOTE: the mask is dense, so attention memory grows with T x (step+1)*T per sample and head.
            # DeepSpec uses a sparse flex-attention block mask here for long sequences on GPU.
            mask = ttt_attention_mask(lengths, seq_len, step)
            hidden, past = self.step(step_ids, hidden, positions + step, past, mask)
            output.output_hidden.append(hidden)
            output.draft_logits.append(self.compute_logits(hidden))
            output.target_probs.append(padded[:, step : step + seq_len])
            output.target_argmax.append(padded_argmax[:, step : step + seq_len])
            output.position_masks.append(shift_left(base_mask, step))
            step_ids = shift_left(step_ids, 1)
        return output


def _check_family(config: AnyEagle3Config, model_type: str, expected: str) -> None:
    if config.model_type != model_type:
        raise ValueError(f"{expected} needs a config with model_type {model_type!r}, got {config.model_type!r}")


class Qwen3Eagle3Model(Eagle3Model):
    """The Eagle3 draft for a Qwen3 target (``architectures: ["Qwen3Eagle3Model"]``)."""

    config_class = Eagle3Config
    config: Eagle3Config
    _no_split_modules = ["Qwen3Eagle3DecoderLayer"]

    def __init__(self, config: Eagle3Config) -> None:
        super().__init__(config)
        _check_family(config, "qwen3", QWEN3_ARCHITECTURE)
        validate_eagle3_config(config)
        hidden = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, hidden)
        self.fc = nn.Linear(len(config.target_layer_ids) * hidden, hidden, bias=False)
        self.layers = nn.ModuleList(Qwen3Eagle3DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = Qwen3RMSNorm(hidden, eps=config.rms_norm_eps)
        self.rotary_emb = DSparkRotaryEmbedding(config)
        self.lm_head = nn.Linear(hidden, config.vocab_size, bias=False)
        self.post_init()
        self._freeze_shared()

    def rotary(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary_emb(x, positions)


class Gemma4Eagle3Model(Eagle3Model):
    """The Eagle3 draft for a Gemma4 target (``architectures: ["Gemma4Eagle3Model"]``).

    The token embedding is scaled by ``sqrt(hidden_size)`` and logits are
    soft-capped with ``final_logit_softcapping``.
    """

    config_class = Gemma4Eagle3Config
    config: Gemma4Eagle3Config
    _no_split_modules = ["Gemma4Eagle3DecoderLayer"]

    def __init__(self, config: Gemma4Eagle3Config) -> None:
        super().__init__(config)
        _check_family(config, "gemma4_text", GEMMA4_ARCHITECTURE)
        validate_eagle3_config(config)
        if getattr(config, "enable_moe_block", False):
            raise ValueError("enable_moe_block must be false: Gemma4 drafts have no mixture-of-experts blocks")
        if getattr(config, "hidden_size_per_layer_input", 0):
            raise ValueError("hidden_size_per_layer_input must be 0: Gemma4 drafts take no per-layer inputs")
        shape = layer_shape(config)
        hidden = config.hidden_size
        self.embed_tokens = Gemma4TextScaledWordEmbedding(
            config.vocab_size, hidden, config.pad_token_id, embed_scale=hidden**0.5
        )
        self.fc = nn.Linear(len(config.target_layer_ids) * hidden, hidden, bias=False)
        self.layers = nn.ModuleList(Gemma4Eagle3DecoderLayer(shape) for _ in range(config.num_hidden_layers))
        self.norm = Gemma4RMSNorm(hidden, eps=config.rms_norm_eps)
        self.rotary_emb = Gemma4RotaryEmbedding(config)
        self.lm_head = nn.Linear(hidden, config.vocab_size, bias=False)
        self.post_init()
        self._freeze_shared()

    @property
    def logit_softcap(self) -> float | None:
        return self.config.final_logit_softcapping or None

    def rotary(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary_emb(positions, x.dtype)


def draft_config_values(
    target_config: Any,
    *,
    layer_ids: list[int],
    num_layers: int,
    ttt_length: int,
    step_loss_decay: float,
    name_or_path: str | None,
) -> dict[str, Any]:
    """Return the draft config fields: a copy of the target's (text) config with the Eagle3 overrides."""
    values = target_config.to_dict()
    # The target's layer_types has one entry per target layer and fails validation
    # once num_hidden_layers changes, so it is replaced, not edited.
    for key in (
        "layer_types",
        "architectures",
        "model_type",
        "transformers_version",
        "_name_or_path",
        "auto_map",
        "per_layer_config",
    ):
        values.pop(key, None)
    values.update(
        num_hidden_layers=num_layers,
        layer_types=["full_attention"] * num_layers,
        tie_word_embeddings=False,
        num_target_layers=target_config.num_hidden_layers,
        target_layer_ids=list(layer_ids),
        target_model_name_or_path=name_or_path,
        ttt_length=ttt_length,
        step_loss_decay=step_loss_decay,
        draft_num_hidden_layers=num_layers,
    )
    return values


def _target_parts(target_model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module | None]:
    embed = target_model.get_input_embeddings()
    head = target_model.get_output_embeddings()
    if embed is None or head is None:
        raise ValueError(
            f"{type(target_model).__name__} lacks an input embedding or an LM head; pass the causal-LM model "
            "(e.g. Qwen3ForCausalLM), not the bare backbone"
        )
    backbone = getattr(target_model, "model", None)
    norm = getattr(backbone, "norm", None)
    if norm is None:
        # Gemma4ForConditionalGeneration keeps the text decoder under model.language_model.
        norm = getattr(getattr(backbone, "language_model", None), "norm", None)
    return embed, head, norm


def build_eagle3_draft(
    target_model: nn.Module,
    *,
    layer_ids: list[int],
    num_layers: int = 1,
    ttt_length: int = 7,
    step_loss_decay: float = 0.8,
    seed: int = 0,
) -> Eagle3Model:
    """Build a float32 Eagle3 draft for a Qwen3 or Gemma4 target.

    The draft config copies the target's (for Gemma4, its text config) with
    the Eagle3 fields. ``embed_tokens`` and ``lm_head`` are frozen copies of
    the target's. Other weights come from the Hugging Face initialisation
    under ``torch.manual_seed(seed)``, and the global RNG state is restored.
    """
    target_config = target_model.config
    model_type = getattr(target_config, "model_type", None)
    name_or_path = getattr(target_config, "_name_or_path", None) or None
    if model_type == "qwen3":
        model_class: type[Eagle3Model] = Qwen3Eagle3Model
        text_config = target_config
        extra: dict[str, Any] = {}
    elif model_type in ("gemma4", "gemma4_text"):
        model_class = Gemma4Eagle3Model
        text_config = target_config.get_text_config()
        head_dim, global_kv_heads = global_attention_sizes(text_config)
        extra = {
            "target_model_type": model_type,
            "target_text_model_type": text_config.model_type,
            "global_head_dim": head_dim,
            # NOTE: without attention_k_eq_v, recent transformers drop num_global_key_value_heads
            # from the target config; the draft does not use it then, so it is left unset.
            "num_global_key_value_heads": global_kv_heads if text_config.attention_k_eq_v else None,
        }
    else:
        raise ValueError(
            f"build_eagle3_draft supports Qwen3 and Gemma4 targets, got model_type {model_type!r}; "
            "load the target with AutoModelForCausalLM from a Qwen3 or Gemma4 checkpoint"
        )
    validate_target_layer_ids(list(layer_ids), text_config.num_hidden_layers)
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    values = draft_config_values(
        text_config,
        layer_ids=layer_ids,
        num_layers=num_layers,
        ttt_length=ttt_length,
        step_loss_decay=step_loss_decay,
        name_or_path=name_or_path,
    )
    values.update(extra)
    architecture = QWEN3_ARCHITECTURE if model_class is Qwen3Eagle3Model else GEMMA4_ARCHITECTURE
    config = model_class.config_class(architectures=[architecture], **values)

    embed, head, norm = _target_parts(target_model)
    return instantiate_from_target(model_class, config, seed=seed, embed=embed, head=head, norm=norm)


def eagle3_model_class(architecture: str) -> type[Eagle3Model]:
    """Return the model class of an Eagle3 ``architectures`` entry."""
    if architecture == QWEN3_ARCHITECTURE:
        return Qwen3Eagle3Model
    if architecture == GEMMA4_ARCHITECTURE:
        return Gemma4Eagle3Model
    raise ValueError(f"architecture {architecture!r} is not an Eagle3 draft; expected one of {EAGLE3_ARCHITECTURES}")


def is_eagle3(model: nn.Module) -> bool:
    """Return whether ``model`` is an Eagle3 draft (of any target family)."""
    return isinstance(model, Eagle3Model)


def eagle3_kwargs_from_config(draft: DraftConfig, *, layer_ids: list[int], seed: int = 0) -> dict[str, Any]:
    """Map a pipeline ``DraftConfig`` (plus the cached layer ids) to ``build_eagle3_draft`` keyword arguments."""
    return {
        "layer_ids": list(layer_ids),
        "num_layers": draft.num_layers,
        "ttt_length": draft.ttt_length,
        "step_loss_decay": draft.step_loss_decay,
        "seed": seed,
    }


__all__ = [
    "EAGLE3_ARCHITECTURES",
    "FROZEN_PARAMETERS",
    "Eagle3Config",
    "Eagle3ForwardOutput",
    "Eagle3Model",
    "Gemma4Eagle3Config",
    "Gemma4Eagle3Model",
    "Qwen3Eagle3Model",
    "build_eagle3_draft",
]
