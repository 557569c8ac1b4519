"""Every shipped YAML config loads, and the per-(algorithm, target) configs carry DeepSpec's settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepspec.config import load_config
from deepspec.pipeline import stage_fingerprints

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
ALL_CONFIGS = sorted(str(path.relative_to(CONFIG_DIR)) for path in CONFIG_DIR.rglob("*.yaml"))

ALGORITHMS = ("eagle3", "dflash", "dspark")
# DeepSpec's per-target settings: hub id, target layer ids, mask token id of DSpark/DFlash.
TARGETS = {
    "qwen3_4b": ("Qwen/Qwen3-4B", [1, 9, 17, 25, 33], 151669),
    "qwen3_8b": ("Qwen/Qwen3-8B", [1, 9, 17, 25, 33], 151669),
    "qwen3_14b": ("Qwen/Qwen3-14B", [1, 10, 19, 28, 37], 151669),
    "gemma4_12b": ("google/gemma-4-12B-it", [5, 17, 29, 41, 46], 4),
}
# DeepSpec's per-algorithm draft settings.
DRAFT_SETTINGS = {
    "eagle3": {"num_layers": 1, "ttt_length": 7, "step_loss_decay": 0.8},
    "dflash": {
        "num_layers": 5,
        "block_size": 7,
        "num_anchors": 512,
        "markov_rank": 0,
        "confidence_head_alpha": 0.0,
        "loss_decay_gamma": 4.0,
        "ce_loss_alpha": 1.0,
        "l1_loss_alpha": 0.0,
    },
    "dspark": {
        "num_layers": 5,
        "block_size": 7,
        "num_anchors": 512,
        "markov_rank": 256,
        "markov_head_type": "vanilla",
        "confidence_head_alpha": 1.0,
        "confidence_head_with_markov": True,
        "loss_decay_gamma": 4.0,
        "ce_loss_alpha": 0.1,
        "l1_loss_alpha": 0.9,
    },
}
SEEDS = {"eagle3": 0, "dflash": 42, "dspark": 42}
REFERENCE_CONFIGS = [(algorithm, target) for algorithm in ALGORITHMS for target in TARGETS]


def reference_path(algorithm: str, target: str) -> Path:
    return CONFIG_DIR / algorithm / f"{algorithm}_{target}.yaml"


def test_config_dir_has_configs():
    assert len(ALL_CONFIGS) >= len(REFERENCE_CONFIGS) + len(ALGORITHMS)


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_config_loads(name):
    config = load_config(CONFIG_DIR / name)
    assert config.data.sources
    assert set(config.eval.benchmarks or []) <= {source.name for source in config.data.sources}


@pytest.mark.parametrize(("algorithm", "target"), REFERENCE_CONFIGS)
def test_reference_config_values(algorithm, target):
    config = load_config(reference_path(algorithm, target))
    hub_id, layer_ids, mask_token_id = TARGETS[target]
    assert config.target.name_or_path == hub_id
    assert config.target.dtype == "bfloat16"
    assert config.cache.layer_ids == layer_ids
    assert config.cache.max_length == 4096
    assert config.draft.algorithm == algorithm
    for key, value in DRAFT_SETTINGS[algorithm].items():
        assert getattr(config.draft, key) == value, f"draft.{key}"
    if algorithm != "eagle3":
        assert config.draft.mask_token_id == mask_token_id

    train = config.train
    assert train.lr == 6.0e-4
    assert train.warmup_ratio == 0.04
    assert train.weight_decay == 0.0
    assert train.global_batch_size == 512
    assert train.per_device_batch_size == 1
    assert train.max_grad_norm == 1.0
    assert train.precision == "bf16"
    assert train.checkpoint_every == 3000
    assert train.log_every == 10
    assert train.seed == SEEDS[algorithm]

    assert config.eval.temperatures == [1.0]
    assert config.eval.max_new_tokens == 2048
    assert config.eval.seed == 980406


@pytest.mark.parametrize("target", list(TARGETS))
def test_algorithms_share_upstream_outputs(target):
    fingerprints = [stage_fingerprints(load_config(reference_path(algorithm, target))) for algorithm in ALGORITHMS]
    for stage in ("prompts", "regen", "cache"):
        assert len({each[stage] for each in fingerprints}) == 1, stage
    assert len({each["train"] for each in fingerprints}) == len(ALGORITHMS)


def test_toy_configs_share_cache():
    configs = [load_config(CONFIG_DIR / "local" / f"{algorithm}_toy.yaml") for algorithm in ALGORITHMS]
    assert [config.draft.algorithm for config in configs] == list(ALGORITHMS)
    assert all(config.target.name_or_path == "toy" for config in configs)
    assert len({stage_fingerprints(config)["cache"] for config in configs}) == 1
