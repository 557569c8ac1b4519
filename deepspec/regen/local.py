"""In-process regeneration backend: batched Hugging Face ``generate`` on the target."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from deepspec.config import RegenConfig


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (an end token was produced) or "length" (max_new_tokens reached)
    num_tokens: int


class LocalGenerator:
    """Generate one assistant turn for a batch of rendered prompts, left-padded."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        settings: RegenConfig,
        end_token_ids: list[int],
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.end_token_ids = end_token_ids
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else end_token_ids[0]

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]]) -> list[Completion]:
        device = self.model.device
        width = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        settings = self.settings
        sampling: dict[str, object] = {"do_sample": False}
        if settings.temperature > 0:
            # top_k 0 disables the top-k filter in transformers' generate.
            sampling = {
                "do_sample": True,
                "temperature": settings.temperature,
                "top_p": settings.top_p,
                "top_k": settings.top_k,
            }
        output = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=settings.max_new_tokens,
            eos_token_id=self.end_token_ids,
            pad_token_id=self.pad_token_id,
            **sampling,
        )
        new_tokens = output[:, width:].tolist()
        return [self._completion(tokens) for tokens in new_tokens]

    def _completion(self, tokens: list[int]) -> Completion:
        end_positions = [index for index, token in enumerate(tokens) if token in self.end_token_ids]
        if end_positions:
            answer = tokens[: end_positions[0]]
            reason = "stop"
        else:
            answer = tokens
            reason = "length"
        text = self.tokenizer.decode(answer, skip_special_tokens=False)
        return Completion(text=text, finish_reason=reason, num_tokens=len(answer))
