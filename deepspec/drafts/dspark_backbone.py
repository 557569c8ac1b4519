"""The parts every DSpark / DFlash draft shares, whatever its target family.

The draft predicts a block of ``block_size`` tokens in parallel. Besides the
block itself, its attention reads the target's hidden states ("KV
injection"). The chosen target layers' outputs are concatenated, projected by
``fc`` and normalised by ``hidden_norm`` into one context tensor. Every draft
layer turns that tensor into extra keys and values with its own projections,
and no layer updates the context.

A block anchored at position ``a`` holds the real token ``x_a`` in slot 0 and
``mask_token_id`` in the other slots, sits at positions ``a .. a+bs-1``, and
slot ``j`` predicts ``x_{a+j+1}``. It attends to the context strictly before
``a`` and bidirectionally to its own slots. DFlash is this model with
``markov_rank`` 0 and no confidence head.

This module holds anchor sampling, the block mask, the labels, the config
checks on the draft fields and ``DSparkModelBase``, the training forward that
family models (Qwen3, Gemma4) inherit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from deepspec.drafts.heads import MARKOV_HEAD_TYPES, ConfidenceHead, MarkovHead, build_markov_head


def validate_target_layer_ids(layer_ids: list[int], num_target_layers: int) -> None:
    """Reject layer ids that are empty, unsorted, repeated or outside ``[-1, num_target_layers - 2]``.

    Id -1 is the embedding output. The last layer is rejected because its
    output as seen at decoding time (Hugging Face's last hidden state) has the
    final norm applied, unlike the cached raw layer outputs.
    """
    if not layer_ids:
        raise ValueError("target_layer_ids is empty; list at least one target layer whose output feeds the draft")
    if any(later <= earlier for earlier, later in zip(layer_ids, layer_ids[1:], strict=False)):
        raise ValueError(f"target_layer_ids must be strictly increasing, got {layer_ids}")
    last_allowed = num_target_layers - 2
    bad = [layer for layer in layer_ids if layer < -1 or layer > last_allowed]
    if bad:
        raise ValueError(
            f"target_layer_ids {bad} are invalid for a target with {num_target_layers} layers: "
            f"use ids in [-1, {last_allowed}] (-1 is the embedding output; the last layer is not allowed)"
        )


def validate_draft_fields(config: Any) -> None:
    """Check the draft-specific config fields and their combinations, naming the field and the fix."""
    if config.target_layer_ids is None or config.num_target_layers is None:
        raise ValueError("draft config lacks target_layer_ids or num_target_layers; build it with build_draft()")
    validate_target_layer_ids(list(config.target_layer_ids), config.num_target_layers)
    if config.block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {config.block_size}")
    if config.mask_token_id is None or not 0 <= config.mask_token_id < config.vocab_size:
        raise ValueError(f"mask_token_id must be a token id in [0, {config.vocab_size}), got {config.mask_token_id}")
    if config.num_anchors < 1:
        raise ValueError(f"num_anchors must be >= 1, got {config.num_anchors}")
    if config.markov_rank < 0:
        raise ValueError(f"markov_rank must be >= 0 (0 disables the Markov head), got {config.markov_rank}")
    if config.markov_rank > 0 and config.markov_head_type not in MARKOV_HEAD_TYPES:
        raise ValueError(
            f"markov_head_type must be one of {', '.join(MARKOV_HEAD_TYPES)} when markov_rank > 0, "
            f"got {config.markov_head_type!r}"
        )
    if config.enable_confidence_head:
        if config.confidence_head_with_markov is None:
            raise ValueError(
                "enable_confidence_head is true, so confidence_head_with_markov must be set (true or false)"
            )
        if config.confidence_head_with_markov and config.markov_rank == 0:
            raise ValueError("confidence_head_with_markov needs a Markov head; set markov_rank > 0 or set it to false")
    if config.tie_word_embeddings:
        raise ValueError("tie_word_embeddings must be false: the draft stores embed_tokens and lm_head separately")


@dataclass
class DSparkForwardOutput:
    """Everything the loss and the training metrics need from one forward pass."""

    draft_logits: torch.Tensor  # [B, N, bs, V], Markov-corrected
    target_ids: torch.Tensor  # int64 [B, N, bs]
    eval_mask: torch.Tensor  # bool [B, N, bs], a contiguous supervised prefix per block
    block_keep_mask: torch.Tensor  # bool [B, N]
    anchor_positions: torch.Tensor  # int64 [B, N]
    confidence_pred: torch.Tensor | None  # float32 [B, N, bs] raw logits
    aligned_target_logits: torch.Tensor | None  # [B, N, bs, V], no gradient
    num_valid_anchors: torch.Tensor  # int64 [B], anchor candidates per sample
    seq_len: int


def anchor_candidates(loss_mask: torch.Tensor) -> torch.Tensor:
    """Return bool ``[B, S-1]``: position i may anchor a block iff ``loss_mask[i]`` and ``loss_mask[i+1]`` are set."""
    supervised = loss_mask > 0
    return supervised[:, :-1] & supervised[:, 1:]


def sample_anchor_positions(
    loss_mask: torch.Tensor, num_anchors: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw up to ``num_anchors`` distinct anchors per sample, uniformly among the candidates.

    Returns ``anchor_positions`` (int64 ``[B, N]``, ascending among kept
    blocks) and ``block_keep_mask`` (bool ``[B, N]``). A sample with fewer
    candidates than N keeps all of them; its remaining blocks are dummies at
    position 0, placed after the kept ones.
    """
    batch, seq_len = loss_mask.shape
    device = loss_mask.device
    if seq_len < 2:
        empty = torch.zeros(batch, num_anchors, dtype=torch.long, device=device)
        return empty, torch.zeros(batch, num_anchors, dtype=torch.bool, device=device)

    candidates = anchor_candidates(loss_mask)
    # Draw on the generator's device, so a CPU generator also serves batches on an accelerator.
    draw_device = generator.device if generator is not None else device
    scores = torch.rand(candidates.shape, generator=generator, device=draw_device).to(device)
    scores = scores.masked_fill(~candidates, 2.0)
    order = scores.argsort(dim=1)[:, :num_anchors]
    picked_valid = scores.gather(1, order) < 2.0
    sentinel = seq_len  # sorts after every real position
    picked = torch.where(picked_valid, order, torch.full_like(order, sentinel)).sort(dim=1).values
    if picked.shape[1] < num_anchors:
        padding = torch.full((batch, num_anchors - picked.shape[1]), sentinel, dtype=torch.long, device=device)
        picked = torch.cat([picked, padding], dim=1)
    keep = picked < sentinel
    return torch.where(keep, picked, torch.zeros_like(picked)), keep


def build_block_attention_mask(
    anchor_positions: torch.Tensor, block_keep_mask: torch.Tensor, seq_len: int, block_size: int
) -> torch.Tensor:
    """Return bool ``[B, 1, N*bs, S + N*bs]`` (True = may attend) for the training forward.

    A query of block n may attend to context key j iff j < anchor_n, and to the
    draft keys of its own block. Queries of dummy blocks attend to nothing.
    """
    batch, num_blocks = anchor_positions.shape
    device = anchor_positions.device
    num_queries = num_blocks * block_size
    query_block = torch.arange(num_queries, device=device) // block_size
    query_anchor = anchor_positions[:, query_block]  # [B, Q]
    query_keep = block_keep_mask[:, query_block]  # [B, Q]
    context_visible = torch.arange(seq_len, device=device)[None, None, :] < query_anchor[:, :, None]
    same_block = (query_block[:, None] == query_block[None, :]).expand(batch, -1, -1)
    mask = torch.cat([context_visible, same_block], dim=2) & query_keep[:, :, None]
    return mask.unsqueeze(1)


def block_labels(
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    anchor_positions: torch.Tensor,
    block_keep_mask: torch.Tensor,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(label_index, target_ids, eval_mask)``, each ``[B, N, bs]``.

    Slot j of the block anchored at a predicts the token at ``a + j + 1``
    (clamped to S-1 for gathering; dummy blocks use 0). A slot is supervised
    iff its label exists, ``loss_mask[label]`` is set and the block is kept.
    A cumulative product along the block then keeps only the supervised prefix.
    """
    batch, seq_len = input_ids.shape
    slots = torch.arange(block_size, device=input_ids.device)
    raw_index = anchor_positions[:, :, None] + slots + 1
    keep = block_keep_mask[:, :, None]
    label_index = torch.where(keep, raw_index.clamp(max=seq_len - 1), torch.zeros_like(raw_index))
    flat_index = label_index.reshape(batch, -1)
    target_ids = input_ids.gather(1, flat_index).view_as(label_index)
    label_supervised = (loss_mask > 0).gather(1, flat_index).view_as(label_index)
    valid = (raw_index < seq_len) & label_supervised & keep
    eval_mask = valid.long().cumprod(dim=-1).bool()
    return label_index, target_ids, eval_mask


ContextKV = list[tuple[torch.Tensor, torch.Tensor]]


class DSparkModelBase(PreTrainedModel):
    """The training forward and the heads of a DSpark / DFlash draft; subclasses supply the layers.

    A subclass creates ``embed_tokens``, ``layers``, ``norm``, ``fc``,
    ``hidden_norm`` and ``lm_head``, calls ``_add_heads`` and ``_finish_init``,
    and implements ``context_kv`` and ``backbone``. Each layer's
    ``self_attn`` exposes ``num_kv_heads`` and ``head_dim`` (the drafter sizes
    its KV cache from them).
    """

    base_model_prefix = ""
    main_input_name = "input_ids"
    _supports_sdpa = True

    fc: nn.Linear
    hidden_norm: nn.Module
    lm_head: nn.Linear
    layers: nn.ModuleList

    def _add_heads(self, config: Any) -> None:
        self.markov_head: MarkovHead | None = None
        if config.markov_rank > 0:
            self.markov_head = build_markov_head(
                config.markov_head_type,
                vocab_size=config.vocab_size,
                hidden_size=config.hidden_size,
                rank=config.markov_rank,
            )
        self.confidence_head: ConfidenceHead | None = None
        if config.enable_confidence_head:
            self.confidence_head = ConfidenceHead(
                config.hidden_size, config.markov_rank, bool(config.confidence_head_with_markov)
            )

    def _finish_init(self) -> None:
        self.post_init()
        # The token embedding and LM head are frozen copies of the target's.
        self.embed_tokens.weight.requires_grad_(False)
        self.lm_head.weight.requires_grad_(False)

    @property
    def block_size(self) -> int:
        return self.config.block_size

    def context_features(self, target_hidden_states: torch.Tensor) -> torch.Tensor:
        """Project concatenated target layer outputs ``[..., L*H]`` to the context ``[..., H]``."""
        return self.hidden_norm(self.fc(target_hidden_states.to(self.fc.weight.dtype)))

    def context_kv(self, context: torch.Tensor, positions: torch.Tensor) -> ContextKV:
        """Return each layer's context keys/values for ``context [B, S, H]`` at ``positions [B, S]``."""
        raise NotImplementedError

    def backbone(
        self, block_ids: torch.Tensor, positions: torch.Tensor, context_kv: ContextKV, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Run the draft layers over ``block_ids [B, Q]`` at ``positions [B, Q]``; return ``norm(x)`` ``[B, Q, H]``."""
        raise NotImplementedError

    def base_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Return the LM-head logits of post-norm states (soft-capped where the family does so)."""
        return self.lm_head(hidden)

    def confidence_logits(self, hidden: torch.Tensor, prev_ids: torch.Tensor) -> torch.Tensor | None:
        """Return raw confidence logits for slots with backbone outputs ``hidden`` and previous tokens ``prev_ids``."""
        if self.confidence_head is None:
            return None
        prev_embedding = None
        if self.confidence_head.with_markov:
            assert self.markov_head is not None  # guaranteed by validate_draft_fields
            prev_embedding = self.markov_head.embed(prev_ids)
        return self.confidence_head(hidden, prev_embedding)

    def forward(
        self,
        input_ids: torch.Tensor,
        target_hidden_states: torch.Tensor,
        loss_mask: torch.Tensor,
        target_last_hidden_states: torch.Tensor | None = None,
        anchor_positions: torch.Tensor | None = None,
        block_keep_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> DSparkForwardOutput:
        """Training forward over ``num_anchors`` blocks per sample.

        ``input_ids`` and ``loss_mask`` are ``[B, S]``, ``target_hidden_states``
        ``[B, S, L*H]`` (raw target layer outputs) and
        ``target_last_hidden_states`` ``[B, S, H]`` (the target's post-norm
        last hidden state, for the aligned target logits). Anchors are sampled
        with ``generator`` unless ``anchor_positions`` and ``block_keep_mask``
        are given.
        """
        batch, seq_len = input_ids.shape
        config = self.config
        if target_hidden_states.shape[:2] != (batch, seq_len) or loss_mask.shape != (batch, seq_len):
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)}, loss_mask {tuple(loss_mask.shape)} and "
                f"target_hidden_states {tuple(target_hidden_states.shape)} must share [batch, seq_len]"
            )
        expected_features = len(config.target_layer_ids) * config.hidden_size
        if target_hidden_states.shape[-1] != expected_features:
            raise ValueError(
                f"target_hidden_states has {target_hidden_states.shape[-1]} features per token, expected "
                f"{expected_features} = {len(config.target_layer_ids)} target layers x hidden {config.hidden_size}"
            )
        if anchor_positions is None:
            anchor_positions, block_keep_mask = sample_anchor_positions(loss_mask, config.num_anchors, generator)
        elif block_keep_mask is None:
            raise ValueError("anchor_positions was given without block_keep_mask; pass both or neither")
        elif anchor_positions.shape != block_keep_mask.shape or anchor_positions.shape[0] != batch:
            raise ValueError(
                f"anchor_positions {tuple(anchor_positions.shape)} and block_keep_mask "
                f"{tuple(block_keep_mask.shape)} must both be [batch={batch}, num_blocks]"
            )
        anchor_positions = anchor_positions.long()
        block_keep_mask = block_keep_mask.bool()
        num_blocks, block_size = anchor_positions.shape[1], config.block_size

        # Block inputs: the anchor token in slot 0, the mask token elsewhere and in dummy blocks.
        anchor_tokens = input_ids.gather(1, anchor_positions)  # [B, N]
        slots = torch.arange(block_size, device=input_ids.device)
        block_ids = torch.full((batch, num_blocks, block_size), config.mask_token_id, device=input_ids.device)
        block_ids[:, :, 0] = torch.where(block_keep_mask, anchor_tokens, block_ids[:, :, 0])
        block_positions = anchor_positions[:, :, None] + slots

        context = self.context_features(target_hidden_states)
        context_positions = torch.arange(seq_len, device=input_ids.device).expand(batch, seq_len)
        context_kv = self.context_kv(context, context_positions)
        # NOTE: the mask is dense, so attention memory grows with N*bs x (S + N*bs) per sample and
        # head. DeepSpec uses a sparse flex-attention block mask here for long sequences on GPU.
        mask = build_block_attention_mask(anchor_positions, block_keep_mask, seq_len, block_size)
        hidden = self.backbone(block_ids.view(batch, -1), block_positions.view(batch, -1), context_kv, mask).view(
            batch, num_blocks, block_size, -1
        )

        label_index, target_ids, eval_mask = block_labels(
            input_ids, loss_mask, anchor_positions, block_keep_mask, block_size
        )
        # Teacher forcing: slot 0 follows the anchor, slot j follows the label of slot j-1.
        prev_ids = torch.cat([anchor_tokens[:, :, None], target_ids[:, :, :-1]], dim=-1)
        draft_logits = self.base_logits(hidden)
        if self.markov_head is not None:
            draft_logits = draft_logits + self.markov_head.block_bias(prev_ids, hidden)
        confidence_pred = self.confidence_logits(hidden, prev_ids)

        aligned_target_logits = None
        if target_last_hidden_states is not None:
            # The target's next-token distribution for label t comes from its state at t - 1.
            source_index = (label_index - 1).clamp(min=0).view(batch, -1)
            gathered = target_last_hidden_states.gather(
                1, source_index[:, :, None].expand(-1, -1, target_last_hidden_states.shape[-1])
            )
            with torch.no_grad():
                aligned_target_logits = self.base_logits(gathered.to(self.lm_head.weight.dtype))
            aligned_target_logits = aligned_target_logits.view(batch, num_blocks, block_size, -1)

        return DSparkForwardOutput(
            draft_logits=draft_logits,
            target_ids=target_ids,
            eval_mask=eval_mask,
            block_keep_mask=block_keep_mask,
            anchor_positions=anchor_positions,
            confidence_pred=confidence_pred,
            aligned_target_logits=aligned_target_logits,
            num_valid_anchors=anchor_candidates(loss_mask).sum(dim=1),
            seq_len=seq_len,
        )

    forward_train = forward


def dspark_config_fields(
    *,
    num_target_layers: int,
    layer_ids: list[int],
    block_size: int,
    mask_token_id: int,
    num_anchors: int,
    enable_confidence_head: bool,
    confidence_head_with_markov: bool | None,
    markov_rank: int,
    markov_head_type: str | None,
) -> dict[str, Any]:
    """Return the draft fields a DSpark / DFlash ``config.json`` adds to the copied target config."""
    return {
        "tie_word_embeddings": False,
        "num_target_layers": num_target_layers,
        "target_layer_ids": list(layer_ids),
        "block_size": block_size,
        "mask_token_id": mask_token_id,
        "num_anchors": num_anchors,
        "enable_confidence_head": enable_confidence_head,
        # The reference leaves the settings of a disabled head out of config.json.
        "confidence_head_with_markov": confidence_head_with_markov if enable_confidence_head else None,
        "markov_rank": markov_rank,
        "markov_head_type": markov_head_type if markov_rank > 0 else None,
    }
