from pathlib import Path

import pytest

from deepspec.config import ConfigError, apply_override, load_config, validate_config

REPO = Path(__file__).resolve().parents[2]
MINIMAL = {"data": {"sources": [{"name": "gsm8k"}]}}


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_every_shipped_config_validates():
    files = sorted((REPO / "configs").rglob("*.yaml"))
    assert files, "configs/ holds no YAML file"
    for path in files:
        load_config(path)


def test_override_gives_typed_float(tmp_path):
    path = write_yaml(tmp_path, "data:\n  sources:\n    - name: gsm8k\n")
    config = load_config(path, ["train.lr=3e-4", "train.max_steps=12", "eval.temperatures=[0, 1.0]"])
    assert isinstance(config.train.lr, float)
    assert config.train.lr == pytest.approx(3e-4)
    assert config.train.max_steps == 12
    assert config.eval.temperatures == [0.0, 1.0]


def test_override_keeps_numeric_text_for_string_key():
    raw = {"data": {"sources": [{"name": "gsm8k"}]}}
    apply_override(raw, "storage.root=2024")
    assert validate_config(raw).storage.root == "2024"


def test_unknown_key_names_dotted_path_and_allowed_keys(tmp_path):
    path = write_yaml(tmp_path, "data:\n  sources:\n    - name: gsm8k\ntrain:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "train.learning_rate" in message
    assert "unknown key" in message
    assert "lr" in message.split("allowed keys here:")[1]


def test_wrong_type_names_key_value_and_allowed(tmp_path):
    path = write_yaml(tmp_path, "data:\n  sources:\n    - name: gsm8k\ntrain:\n  precision: fp8\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "train.precision" in message
    assert "'fp8'" in message
    assert "'fp32' or 'bf16'" in message


def test_unknown_override_key_rejected():
    with pytest.raises(ConfigError, match="unknown config key 'train.lrr'"):
        apply_override(dict(MINIMAL), "train.lrr=1")


def test_override_with_invalid_value_rejected():
    with pytest.raises(ConfigError, match="invalid value 'many' for train.max_steps"):
        apply_override(dict(MINIMAL), "train.max_steps=many")


def test_override_without_equals_rejected():
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_override(dict(MINIMAL), "train.lr")


def test_config_from_environment_variable(tmp_path, monkeypatch):
    path = write_yaml(tmp_path, "data:\n  sources:\n    - name: gsm8k\n")
    monkeypatch.setenv("DEEPSPEC_CONFIG", str(path))
    assert load_config(None).data.sources[0].name == "gsm8k"


def test_missing_config_explains_both_ways(monkeypatch):
    monkeypatch.delenv("DEEPSPEC_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="--config FILE or set the DEEPSPEC_CONFIG"):
        load_config(None)


def test_yaml_is_never_executed(tmp_path):
    path = write_yaml(tmp_path, "!!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_batch_sizes_must_divide():
    raw = {**MINIMAL, "train": {"global_batch_size": 10, "per_device_batch_size": 4}}
    with pytest.raises(ConfigError, match="multiple of"):
        validate_config(raw)


def test_layer_ids_must_increase():
    with pytest.raises(ConfigError, match="strictly increasing"):
        validate_config({**MINIMAL, "cache": {"layer_ids": [2, 1]}})


def test_eval_benchmarks_must_be_sources():
    with pytest.raises(ConfigError, match="not in data.sources"):
        validate_config({**MINIMAL, "eval": {"benchmarks": ["mbpp"]}})


def test_dflash_defaults_turn_heads_off():
    draft = validate_config({**MINIMAL, "draft": {"algorithm": "dflash"}}).draft
    assert (draft.markov_rank, draft.confidence_head_alpha) == (0, 0.0)
    assert (draft.ce_loss_alpha, draft.l1_loss_alpha) == (1.0, 0.0)


def test_dflash_with_markov_head_rejected():
    with pytest.raises(ConfigError, match="dflash has neither head"):
        validate_config({**MINIMAL, "draft": {"algorithm": "dflash", "markov_rank": 8}})


def test_negative_eval_temperature_rejected():
    with pytest.raises(ConfigError, match=r"eval.temperatures.1: Input should be greater than or equal to 0"):
        validate_config({**MINIMAL, "eval": {"temperatures": [0.0, -1.0]}})


def test_cross_section_error_does_not_print_whole_config():
    with pytest.raises(ConfigError) as error:
        validate_config({**MINIMAL, "train": {"global_batch_size": 7, "per_device_batch_size": 2}})
    message = str(error.value)
    assert "train.global_batch_size (7) must be a multiple" in message
    assert "'storage'" not in message


def test_missing_data_dir_named_with_fix(tmp_path, monkeypatch):
    from deepspec.pipeline import resolve_data_dir

    monkeypatch.delenv("DEEPSPEC_DATA_DIR", raising=False)
    config = validate_config({"data": {"data_dir": str(tmp_path / "nope"), "sources": [{"name": "gsm8k"}]}})
    with pytest.raises(ConfigError, match=r"data.data_dir=.*nope' is not a directory"):
        resolve_data_dir(config)
    monkeypatch.setenv("DEEPSPEC_DATA_DIR", str(tmp_path / "also-missing"))
    with pytest.raises(ConfigError, match="DEEPSPEC_DATA_DIR=.*is not a directory"):
        resolve_data_dir(validate_config(MINIMAL))


def test_extends_merges_sections(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "data:\n  sources: [{name: a}, {name: b}]\ndraft:\n  num_layers: 3\n  block_size: 5\n", encoding="utf-8"
    )
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\ndata:\n  sources: [{name: c}]\ndraft:\n  algorithm: dflash\n", "utf-8")
    config = load_config(child)
    assert [source.name for source in config.data.sources] == ["c"]
    assert config.draft.algorithm == "dflash"
    assert config.draft.num_layers == 3
    assert config.draft.block_size == 5
    assert config.draft.markov_rank == 0


def test_extends_cycle_rejected(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n", encoding="utf-8")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_extends_missing_file_named(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("extends: nowhere.yaml\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_config(child)


def test_external_draft_runs_only_prompts_and_eval():
    from deepspec.cli import needed_stages

    config = validate_config(MINIMAL)
    assert needed_stages(config) == ["prompts", "regen", "cache", "train", "eval"]
    external = validate_config({**MINIMAL, "eval": {"draft": "/models/dspark_qwen3_4b_block7"}})
    assert needed_stages(external) == ["prompts", "eval"]


@pytest.mark.parametrize("root", ["", "gs://bucket/x", "S3://bkt/p", "s3:/bkt/p", "s3a://bkt/p", "https://host/p"])
def test_unsupported_storage_root_rejected(root):
    with pytest.raises(ConfigError, match="storage.root"):
        validate_config({**MINIMAL, "storage": {"root": root}})


def test_folder_and_s3_roots_accepted():
    assert validate_config({**MINIMAL, "storage": {"root": "/data/runs"}}).storage.root == "/data/runs"
    assert validate_config({**MINIMAL, "storage": {"root": "s3://bkt/p"}}).storage.root == "s3://bkt/p"
