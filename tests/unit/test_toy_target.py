"""The toy target: corpus reading, chat split, tokenizer, model build, cache and locking."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from deepspec.config import ConfigError, ToyTargetConfig
from deepspec.targets import toy
from deepspec.targets.toy import (
    CHAT_TEMPLATE,
    METADATA_NAME,
    build_model,
    check_toy_config,
    continuation_split,
    conversation_messages,
    corpus_sha256,
    ensure_toy_target,
    packed_batches,
    read_corpus_rows,
    toy_cache_root,
    toy_target_key,
)
from tests.conftest import shared_eval_dir

GSM8K_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."


def tiny_config(**overrides: object) -> ToyTargetConfig:
    settings: dict[str, object] = {
        "vocab_size": 300,
        "hidden_size": 32,
        "num_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "intermediate_size": 64,
        "max_position_embeddings": 128,
        "pretrain_steps": 6,
        "batch_size": 2,
        "seq_len": 32,
        "warmup_steps": 2,
        "heldout_every": 5,
    }
    settings.update(overrides)
    return ToyTargetConfig(**settings)


def eval_data_dir() -> Path:
    """The benchmark prompt folder: ``$DEEPSPEC_DATA_DIR``, else the development checkout's copy."""
    value = os.environ.get("DEEPSPEC_DATA_DIR")
    return Path(value) if value else shared_eval_dir()


def synthetic_rows() -> list[list[str]]:
    rows = [
        ["Write a function that adds two numbers.\ndef add(a, b):\n    return a + b"],
        ["Translate 'héllo wörld' into English and explain the accents ∑ ≠ ∞."],
        ["Summarise the plot of a story about a fox.", "Now rewrite it as a poem."],
        ["List three prime numbers greater than ten and explain why each one is prime."],
    ]
    return rows * 3


@pytest.fixture(scope="module")
def corpus() -> list[list[str]]:
    gsm8k = read_corpus_rows([eval_data_dir() / "gsm8k.jsonl"])
    return synthetic_rows() + gsm8k[:24]


@pytest.fixture(scope="module")
def built_dir(corpus: list[list[str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_toy_target(tiny_config(), corpus, cache_root=tmp_path_factory.mktemp("toy-cache"))


def test_cache_root_env_and_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DEEPSPEC_CACHE_DIR", str(tmp_path / "cache"))
    assert toy_cache_root() == tmp_path / "cache"
    monkeypatch.delenv("DEEPSPEC_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert toy_cache_root() == tmp_path / ".cache" / "deepspec"


def test_read_corpus_rows_skips_blank_lines(tmp_path: Path) -> None:
    first = tmp_path / "a.jsonl"
    first.write_text('{"turns": ["one"]}\n\n   \n{"turns": ["two", "three"]}\n', encoding="utf-8")
    second = tmp_path / "b.jsonl"
    second.write_text('{"turns": ["four"], "id": 7}\n', encoding="utf-8")
    assert read_corpus_rows([first, second]) == [["one"], ["two", "three"], ["four"]]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{not json", "invalid JSON"),
        ('{"prompt": "x"}', "turns"),
        ('{"turns": []}', "non-empty list of strings"),
        ('{"turns": ["ok", 3]}', "non-empty list of strings"),
        ('["x"]', "JSON object"),
    ],
)
def test_read_corpus_rows_malformed_line(tmp_path: Path, line: str, reason: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"turns": ["fine"]}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=reason) as info:
        read_corpus_rows([path])
    assert f"{path}:3" in str(info.value)


def test_continuation_split_cuts_at_whitespace() -> None:
    text = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
    user, assistant = continuation_split(text, 0.4)
    assert user == "alpha beta gamma delta"
    assert assistant == "epsilon zeta eta theta iota kappa"
    assert f"{user} {assistant}" == text


def test_continuation_split_prefers_spaces_to_line_breaks() -> None:
    assert continuation_split("word word\nword word", 0.5) == ("word", "word\nword word")
    assert continuation_split("first line\n\nsecond", 0.4) == ("first", "line\n\nsecond")
    assert continuation_split("aaaa\nbbbb", 0.5) == ("aaaa", "bbbb")


def test_continuation_split_without_inner_whitespace() -> None:
    assert continuation_split("abcdefghij", 0.4) == ("abcd", "efghij")
    assert continuation_split("x", 0.4) == ("x", "")
    assert continuation_split("  padded  ", 0.4) == ("  pa", "dded  ")


def test_continuation_split_of_gsm8k_rows(corpus: list[list[str]]) -> None:
    gsm8k = [row[0] for row in corpus if row[0].endswith(GSM8K_SUFFIX)]
    assert len(gsm8k) == 24
    for text in gsm8k:
        user, assistant = continuation_split(text, 0.4)
        assert user and assistant
        assert not user[-1].isspace()
        assert not assistant[0].isspace()
        assert assistant != GSM8K_SUFFIX
        assert assistant.endswith(GSM8K_SUFFIX)
        assert abs(len(user) - 0.4 * len(text)) < 40


def test_conversation_messages_roles() -> None:
    single = conversation_messages(["one two three four five"], 0.4)
    assert single == [{"role": "user", "content": "one two"}, {"role": "assistant", "content": "three four five"}]
    double = conversation_messages(["question", "follow-up"], 0.4)
    assert double == [{"role": "user", "content": "question"}, {"role": "assistant", "content": "follow-up"}]


def test_chat_template_output(built_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built_dir)
    messages = [{"role": "user", "content": "What is 2+3?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.chat_template == CHAT_TEMPLATE
    with_thinking_flag = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert with_thinking_flag == prompt
    null_content = [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": None}]
    rendered = tokenizer.apply_chat_template(null_content, tokenize=False)
    assert rendered == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n"


def test_tokenizer_special_tokens(built_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built_dir)
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"])
    assert ids == [0, 1, 2, 3]
    assert tokenizer.pad_token_id == 0
    assert tokenizer.eos_token_id == 2
    assert tokenizer.mask_token_id == 3
    assert tokenizer.encode("<|im_start|>user", add_special_tokens=False)[0] == 1
    assert len(tokenizer) == 300


def test_tokenizer_byte_level_round_trip(built_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built_dir)
    for text in ["héllo wörld  \n\tdef f(x):\n    return x**2 ∑", "日本語のテキスト 🙂", "  leading and trailing  "]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text


def test_saved_model_loads_with_auto_classes(built_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(built_dir, dtype=torch.float32)
    config = model.config
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (300, 32, 2)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 16)
    assert config.tie_word_embeddings is True
    assert config.rope_parameters["rope_theta"] == 10_000.0
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.generation_config.eos_token_id == 2
    assert model.generation_config.pad_token_id == 0
    tokenizer = AutoTokenizer.from_pretrained(built_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Janet has"}], add_generation_prompt=True)
    output = model.generate(torch.tensor([prompt["input_ids"]]), max_new_tokens=4, do_sample=False)
    assert output.shape[1] <= len(prompt["input_ids"]) + 4


def test_metadata_records_the_build(built_dir: Path, corpus: list[list[str]]) -> None:
    metadata = json.loads((built_dir / METADATA_NAME).read_text(encoding="utf-8"))
    assert metadata["settings"] == tiny_config().model_dump(mode="json")
    assert metadata["corpus_sha256"] == corpus_sha256(corpus)
    assert metadata["key"] == built_dir.name
    assert metadata["steps"] == 6
    assert metadata["heldout_rows"] == len(range(0, len(corpus), 5))
    assert metadata["train_rows"] + metadata["heldout_rows"] == len(corpus)
    assert metadata["tokens_per_second"] > 0
    assert metadata["wall_seconds"] > 0
    assert metadata["heldout_perplexity"] == pytest.approx(2.718281828 ** metadata["heldout_loss"], rel=1e-3)
    assert 0.0 <= metadata["heldout_top1_accuracy"] <= 1.0
    assert metadata["final_train_loss"] > 0
    for field in ("deepspec_version", "torch_version", "transformers_version", "tokenizers_version"):
        assert metadata[field]


def test_mask_token_row_stays_at_init(built_dir: Path) -> None:
    torch.manual_seed(tiny_config().seed)
    initial = build_model(tiny_config()).get_input_embeddings().weight.detach()
    trained = load_file(str(built_dir / "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(trained[3], initial[3])
    assert not torch.equal(trained[2], initial[2])


def test_build_is_deterministic(corpus: list[list[str]], built_dir: Path, tmp_path: Path) -> None:
    again = ensure_toy_target(tiny_config(), corpus, cache_root=tmp_path)
    assert again != built_dir
    first = load_file(str(built_dir / "model.safetensors"))
    second = load_file(str(again / "model.safetensors"))
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name
    assert (built_dir / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()


def test_other_seed_gives_other_weights(corpus: list[list[str]], built_dir: Path, tmp_path: Path) -> None:
    other = ensure_toy_target(tiny_config(seed=1), corpus, cache_root=tmp_path)
    assert other.name != built_dir.name
    first = load_file(str(built_dir / "model.safetensors"))
    second = load_file(str(other / "model.safetensors"))
    assert not torch.equal(first["model.embed_tokens.weight"], second["model.embed_tokens.weight"])


def test_cache_reused_without_rebuild(corpus: list[list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPSPEC_CACHE_DIR", str(tmp_path))
    first = ensure_toy_target(tiny_config(), corpus)
    assert first.parent == tmp_path / "toy-target"
    assert first.name == toy_target_key(tiny_config(), corpus_sha256(corpus))
    stamp = (first / METADATA_NAME).stat().st_mtime_ns

    def fail_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached toy target was rebuilt")

    monkeypatch.setattr(toy, "_build_toy_target", fail_build)
    assert ensure_toy_target(tiny_config(), corpus) == first
    assert (first / METADATA_NAME).stat().st_mtime_ns == stamp
    assert {path.name for path in first.parent.iterdir()} == {f"{first.name}.lock", first.name}


def test_concurrent_callers_build_once(
    corpus: list[list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds: list[Path] = []
    real_build = toy._build_toy_target
    started = threading.Event()

    def counted_build(cfg: ToyTargetConfig, rows: list[list[str]], out_dir: Path) -> dict[str, object]:
        builds.append(out_dir)
        started.set()
        return real_build(cfg, rows, out_dir)

    monkeypatch.setattr(toy, "_build_toy_target", counted_build)
    results: list[Path] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(ensure_toy_target(tiny_config(), corpus, cache_root=tmp_path))
        except BaseException as error:
            errors.append(error)

    first = threading.Thread(target=call)
    first.start()
    assert started.wait(timeout=120)
    second = threading.Thread(target=call)
    second.start()
    first.join()
    second.join()
    assert errors == []
    assert len(builds) == 1
    assert len(results) == 2
    assert results[0] == results[1]
    assert (results[0] / METADATA_NAME).is_file()


def test_failed_build_leaves_no_directory(
    corpus: list[list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_build(cfg: ToyTargetConfig, rows: list[list[str]], out_dir: Path) -> dict[str, object]:
        (out_dir / "partial.bin").write_bytes(b"x")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(toy, "_build_toy_target", broken_build)
    with pytest.raises(RuntimeError, match="interrupted"):
        ensure_toy_target(tiny_config(), corpus, cache_root=tmp_path)
    names = [path.name for path in (tmp_path / "toy-target").iterdir()]
    assert names == [f"{toy_target_key(tiny_config(), corpus_sha256(corpus))}.lock"]


def test_leftover_temporary_build_is_removed(corpus: list[list[str]], tmp_path: Path) -> None:
    key = toy_target_key(tiny_config(), corpus_sha256(corpus))
    leftover = tmp_path / "toy-target" / f".{key}.tmp-killed"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"partial")
    built = ensure_toy_target(tiny_config(), corpus, cache_root=tmp_path)
    assert not leftover.exists()
    assert built.name == key


def test_directory_without_metadata_is_rejected(corpus: list[list[str]], tmp_path: Path) -> None:
    key = toy_target_key(tiny_config(), corpus_sha256(corpus))
    (tmp_path / "toy-target" / key).mkdir(parents=True)
    with pytest.raises(RuntimeError, match="delete it"):
        ensure_toy_target(tiny_config(), corpus, cache_root=tmp_path)


def test_corpus_without_train_rows_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="both must be non-empty"):
        ensure_toy_target(tiny_config(), [["only one row of text"]], cache_root=tmp_path)


def test_check_toy_config_errors() -> None:
    with pytest.raises(ConfigError, match="target.toy.num_key_value_heads=3"):
        check_toy_config(tiny_config(num_attention_heads=4, num_key_value_heads=3))
    with pytest.raises(ConfigError, match="target.toy.seq_len=256"):
        check_toy_config(tiny_config(seq_len=256, max_position_embeddings=128))
    check_toy_config(ToyTargetConfig())


def test_packed_batches_windows() -> None:
    documents = [torch.arange(10), torch.arange(100, 107), torch.arange(200, 215)]
    batches = packed_batches(documents, seq_len=8, batch_size=2, seed=0)
    seen = [next(batches) for _ in range(6)]
    assert all(batch.shape == (2, 8) for batch in seen)
    all_tokens = set(torch.cat(documents).tolist())
    assert set(torch.cat(seen).flatten().tolist()) <= all_tokens
    again = packed_batches(documents, seq_len=8, batch_size=2, seed=0)
    assert all(torch.equal(next(again), batch) for batch in seen)
    with pytest.raises(ValueError, match="fewer than one window"):
        next(packed_batches([torch.arange(5)], seq_len=8, batch_size=2, seed=0))


def test_lr_schedule_warmup_and_floor() -> None:
    factors = [toy._lr_factor(step, warmup_steps=4, total_steps=20) for step in range(21)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == pytest.approx(1.0)
    assert all(later <= earlier for earlier, later in zip(factors[4:], factors[5:], strict=False))
    assert factors[20] == pytest.approx(0.1)
