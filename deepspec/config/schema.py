"""Typed pipeline configuration: one strict pydantic model per stage.

Every model forbids unknown keys, so a misspelt key in a YAML file or a
``--set`` override fails with its dotted path instead of being ignored.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ToyTargetConfig(StrictModel):
    """Settings of the small Qwen3 target that ``deepspec toy-target`` builds and caches."""

    vocab_size: int = Field(4096, ge=260, description="BPE vocabulary size, special tokens included")
    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(4, ge=2)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int = Field(2, ge=1)
    head_dim: int = Field(32, ge=4)
    intermediate_size: int = Field(512, ge=8)
    max_position_embeddings: int = Field(2048, ge=64)
    pretrain_steps: int = Field(1400, ge=1, description="optimizer steps of pretraining")
    batch_size: int = Field(16, ge=1, description="sequences per pretraining step")
    seq_len: int = Field(256, ge=16, description="tokens per packed pretraining sequence")
    lr: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(30, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    bf16_autocast: bool = True
    seed: int = 0
    heldout_every: int = Field(
        20, ge=2, description="corpus row i is held out for perplexity when i % heldout_every == 0"
    )
    user_fraction: float = Field(
        0.4, gt=0, lt=1, description="share of each corpus prompt, cut at whitespace, used as the user turn"
    )


class TargetConfig(StrictModel):
    name_or_path: str = Field(
        "toy", description='"toy" builds the toy target; otherwise a Hugging Face hub id or a local directory'
    )
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    toy: ToyTargetConfig = ToyTargetConfig()


class SourceConfig(StrictModel):
    """One prompt source: a benchmark name, a local JSONL/Parquet file, or a Hugging Face dataset."""

    name: str = Field(min_length=1, description="label stored in every record; eval reports per name")
    path: str | None = Field(None, description="JSONL or Parquet file; relative paths resolve against data.data_dir")
    hf_id: str | None = Field(None, description="dataset id or local directory for datasets.load_dataset")
    hf_config: str | None = None
    hf_split: str = "train"
    max_rows: int | None = Field(None, ge=1, description="keep only the first N source rows")
    split: Literal["auto", "train", "heldout"] = Field(
        "auto",
        description="auto splits by record hash and data.heldout_fraction; train or heldout puts every row there",
    )

    @model_validator(mode="after")
    def _one_location(self) -> SourceConfig:
        if self.path is not None and self.hf_id is not None:
            raise ValueError(f"source {self.name!r} sets both path and hf_id; set only one")
        return self


class DataConfig(StrictModel):
    data_dir: str | None = Field(
        None, description="folder of benchmark JSONL files; defaults to the DEEPSPEC_DATA_DIR environment variable"
    )
    sources: list[SourceConfig] = Field(min_length=1)
    heldout_fraction: float = Field(0.1, gt=0, lt=1, description="share of records held out for evaluation")
    split_salt: str = Field("deepspec", description="mixed into the record hash that decides the split")
    min_kept_fraction: float = Field(0.5, ge=0, le=1, description="the stage fails when fewer records survive")


class OpenAIRegenConfig(StrictModel):
    """Connection to OpenAI-compatible servers (vLLM, SGLang) for ``regen.backend: openai``.

    Only ``model`` changes the stage fingerprint; the other keys set where and how to reach the servers.
    """

    endpoints: list[str] = Field(
        [], description="base URLs such as http://127.0.0.1:8000/v1; requests are spread over all of them"
    )
    api_key_env: str | None = Field(
        None, description="name of the environment variable that contains the API key (never the key itself)"
    )
    model: str | None = Field(None, description="model name sent in each request; defaults to target.name_or_path")
    max_in_flight_per_endpoint: int = Field(64, ge=1)
    connect_timeout_s: float = Field(10.0, gt=0)
    read_timeout_s: float = Field(600.0, gt=0)
    ready_timeout_s: float = Field(900.0, gt=0, description="how long to wait for the servers to become ready")
    max_retries: int = Field(5, ge=0, description="retries of one request after a transient error")
    backoff_base_s: float = Field(1.0, ge=0)
    backoff_max_s: float = Field(60.0, gt=0)
    max_consecutive_failures: int = Field(
        50, ge=1, description="the run stops (and can be resumed) after this many failed requests in a row"
    )


class RegenConfig(StrictModel):
    backend: Literal["local", "openai"] = "local"
    openai: OpenAIRegenConfig = OpenAIRegenConfig()
    batch_size: int = Field(64, ge=1)
    max_new_tokens: int = Field(128, ge=1, description="generation limit per assistant turn")
    temperature: float = Field(0.0, ge=0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    max_records: int | None = Field(None, ge=1, description="regenerate only the first N train records (by id)")
    max_prompt_tokens: int = Field(
        1024, ge=1, description="longer rendered prompts are rejected (reason prompt_too_long) instead of generated"
    )
    keep_truncated: bool = Field(False, description="keep answers that hit max_new_tokens")
    min_kept_fraction: float = Field(0.2, ge=0, le=1)
    seed: int = 0
    min_p: float = Field(0.0, ge=0, le=1, description="openai backend only; 0 disables the min-p filter")
    enable_thinking: bool | None = Field(
        None,
        description="openai backend only: sent as chat_template_kwargs.enable_thinking; null sends nothing",
    )
    system_prompt_policy: Literal["keep", "fold_into_first_user", "skip"] = Field(
        "keep",
        description=(
            "what to do with a system turn when the target's chat template rejects one: keep (fail), "
            "fold_into_first_user (prepend it to the first user turn) or skip (drop it); regen, cache and eval "
            "render conversations with the same policy"
        ),
    )

    @model_validator(mode="after")
    def _backend_settings(self) -> RegenConfig:
        if self.backend == "openai" and not self.openai.endpoints:
            raise ValueError(
                "regen.backend is openai but regen.openai.endpoints is empty; list the server base URLs, "
                "e.g. regen.openai.endpoints: [http://127.0.0.1:8000/v1]"
            )
        if self.backend == "local" and (self.min_p > 0 or self.enable_thinking is not None):
            raise ValueError(
                f"regen.min_p={self.min_p} and regen.enable_thinking={self.enable_thinking} apply only to "
                "regen.backend openai; set regen.backend: openai or leave both at their defaults (0 and null)"
            )
        return self


class CacheConfig(StrictModel):
    layer_ids: list[int] = Field([1, 2], min_length=1, description="target decoder layers whose outputs feed the draft")
    max_length: int = Field(512, ge=8, description="tokens per rendered conversation")
    overlong: Literal["drop", "truncate_left"] = Field(
        "drop", description="what to do with a conversation longer than max_length"
    )
    min_loss_tokens: int = Field(2, ge=1, description="records with fewer supervised tokens are rejected")
    batch_size: int = Field(16, ge=1)
    hidden_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    min_kept_fraction: float = Field(0.5, ge=0, le=1)
    nproc_per_node: int = Field(1, ge=1, description="processes `deepspec run` starts with torchrun for this stage")

    @model_validator(mode="after")
    def _sorted_ids(self) -> CacheConfig:
        if sorted(set(self.layer_ids)) != list(self.layer_ids):
            raise ValueError(f"cache.layer_ids must be strictly increasing, got {self.layer_ids}")
        return self


# Settings whose default depends on the algorithm; explicit values in the file win.
ALGORITHM_DEFAULTS: dict[str, dict[str, float | int]] = {
    "dspark": {"markov_rank": 32, "confidence_head_alpha": 1.0, "ce_loss_alpha": 0.1, "l1_loss_alpha": 0.9},
    "dflash": {"markov_rank": 0, "confidence_head_alpha": 0.0, "ce_loss_alpha": 1.0, "l1_loss_alpha": 0.0},
    "eagle3": {"markov_rank": 0, "confidence_head_alpha": 0.0, "ce_loss_alpha": 1.0, "l1_loss_alpha": 0.0},
}


class DraftConfig(StrictModel):
    """The draft architecture and its loss.

    DFlash is DSpark without the sequential and confidence heads. Eagle3 reads
    ``num_layers``, ``ttt_length`` and ``step_loss_decay``; the block, anchor,
    head and loss-weight settings belong to DSpark and DFlash.
    """

    algorithm: Literal["dspark", "dflash", "eagle3"] = "dspark"
    num_layers: int = Field(1, ge=1)
    block_size: int = Field(4, ge=2)
    num_anchors: int = Field(64, ge=1, description="blocks sampled per sequence in training")
    markov_rank: int = Field(32, ge=0, description="0 disables the sequential head; dflash default 0")
    markov_head_type: Literal["vanilla", "gated", "rnn"] = "vanilla"
    confidence_head_alpha: float = Field(1.0, ge=0, description="0 disables the confidence head; dflash default 0")
    confidence_head_with_markov: bool = True
    ce_loss_alpha: float = Field(0.1, ge=0, description="dflash default 1.0")
    l1_loss_alpha: float = Field(0.9, ge=0, description="dflash default 0.0")
    loss_decay_gamma: float | None = Field(4.0, description="position weight exp(-k/gamma); null or <= 0 disables")
    mask_token_id: int | None = Field(None, ge=0, description="defaults to the tokenizer's mask token")
    ttt_length: int = Field(7, ge=1, description="eagle3: training-time-test steps, and tokens drafted per round")
    step_loss_decay: float = Field(0.8, gt=0, le=1, description="eagle3: loss weight of TTT step k is decay**k")

    @model_validator(mode="before")
    @classmethod
    def _algorithm_defaults(cls, data: object) -> object:
        if isinstance(data, dict):
            defaults = ALGORITHM_DEFAULTS.get(str(data.get("algorithm", "dspark")), {})
            data = {**defaults, **data}
        return data

    @model_validator(mode="after")
    def _heads_only_for_dspark(self) -> DraftConfig:
        if self.algorithm in ("dflash", "eagle3") and (self.markov_rank > 0 or self.confidence_head_alpha > 0):
            raise ValueError(
                f"draft.algorithm is {self.algorithm} but markov_rank={self.markov_rank} and "
                f"confidence_head_alpha={self.confidence_head_alpha}; {self.algorithm} has neither head: set "
                "both to 0 or use algorithm dspark"
            )
        return self


class TrainConfig(StrictModel):
    lr: float = Field(3e-3, gt=0)
    warmup_ratio: float = Field(0.04, ge=0, lt=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine decay floor as a share of lr")
    weight_decay: float = Field(0.0, ge=0)
    max_steps: int = Field(300, ge=1, description="optimizer steps")
    global_batch_size: int = Field(8, ge=1, description="sequences per optimizer step over all ranks")
    per_device_batch_size: int = Field(8, ge=1, description="sequences per forward pass on one rank")
    max_grad_norm: float = Field(1.0, gt=0)
    precision: Literal["fp32", "bf16"] = "fp32"
    checkpoint_every: int = Field(100, ge=1, description="optimizer steps between checkpoints")
    keep_last: int = Field(2, ge=1, description="checkpoints kept; older ones are deleted")
    log_every: int = Field(10, ge=1)
    seed: int = 0
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    nproc_per_node: int = Field(1, ge=1, description="processes `deepspec run` starts with torchrun")


class EvalConfig(StrictModel):
    benchmarks: list[str] | None = Field(None, description="source names to evaluate; null means every source")
    max_prompts_per_benchmark: int = Field(20, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    temperatures: list[Annotated[float, Field(ge=0)]] = Field(
        [1.0], min_length=1, description="one report per temperature; 0 is greedy"
    )
    seed: int = 0
    compare_untrained: bool = Field(True, description="also evaluate an untrained draft of the same shape")
    draft: str | None = Field(
        None,
        description=(
            "local directory of a draft checkpoint (config.json plus safetensors, e.g. a download of "
            "deepseek-ai/dspark_qwen3_4b_block7) to evaluate instead of the train stage's draft; its settings "
            "come from its config.json and its content hash enters the eval fingerprint"
        ),
    )


class StorageConfig(StrictModel):
    root: str = Field(
        "runs", description="local or mounted folder, or s3://bucket/prefix, that contains every stage output"
    )
    staging_dir: str | None = Field(
        None, description="local mirror of an s3:// root; defaults to $DEEPSPEC_STAGING_DIR, else ~/.cache/deepspec"
    )
    sync_interval_s: float = Field(300.0, ge=0, description="seconds between progress uploads to S3; 0 only at the end")

    @model_validator(mode="after")
    def _supported_root(self) -> StorageConfig:
        root = self.root.strip()
        if not root:
            raise ValueError("storage.root is empty; set a folder (for example runs) or s3://<bucket>/<prefix>")
        scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):/", root)
        if scheme and not root.startswith("s3://"):
            raise ValueError(
                f"storage.root={self.root!r} uses the unsupported scheme {scheme.group(1)!r}; use a local or "
                "mounted folder, or s3://<bucket>/<prefix> (lowercase s3, two slashes)"
            )
        if root.startswith("s3://") and not root[len("s3://") :].split("/")[0]:
            raise ValueError(f"storage.root={self.root!r} names no bucket; write it as s3://<bucket>/<prefix>")
        return self


class PipelineConfig(StrictModel):
    target: TargetConfig = TargetConfig()
    data: DataConfig
    regen: RegenConfig = RegenConfig()
    cache: CacheConfig = CacheConfig()
    draft: DraftConfig = DraftConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    storage: StorageConfig = StorageConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> PipelineConfig:
        train = self.train
        if train.global_batch_size % train.per_device_batch_size != 0:
            raise ValueError(
                f"train.global_batch_size ({train.global_batch_size}) must be a multiple of "
                f"train.per_device_batch_size ({train.per_device_batch_size})"
            )
        names = [source.name for source in self.data.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"data.sources names must be unique, got {names}")
        if self.eval.benchmarks is not None:
            unknown = sorted(set(self.eval.benchmarks) - set(names))
            if unknown:
                raise ValueError(f"eval.benchmarks names {unknown} are not in data.sources (known: {names})")
        return self
