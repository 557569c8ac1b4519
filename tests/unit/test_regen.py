import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deepspec.config import RegenConfig
from deepspec.data.chat import render_prompt_ids
from deepspec.regen.local import LocalGenerator
from deepspec.regen.stage import regenerate_chunk


@pytest.fixture(scope="module")
def target(tiny_target_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_target_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_target_dir)
    return model, tokenizer


def record(rid, *turns):
    messages = []
    for turn in turns:
        messages += [{"role": "user", "content": turn}, {"role": "assistant", "content": None}]
    return {"id": rid, "source": "test", "split": "train", "messages": messages}


def greedy_tokens(model, tokenizer, text, count):
    ids = torch.tensor([render_prompt_ids(tokenizer, [{"role": "user", "content": text}])])
    out = model.generate(input_ids=ids, max_new_tokens=count, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


def generator_for(model, tokenizer, end_ids, max_new_tokens=4):
    settings = RegenConfig(max_new_tokens=max_new_tokens, batch_size=4)
    return LocalGenerator(model, tokenizer, settings, end_ids)


def test_answer_ended_at_once_is_rejected_as_empty(target):
    model, tokenizer = target
    first = greedy_tokens(model, tokenizer, "How many eggs?", 1)[0]
    kept, rejected = regenerate_chunk(
        [record("a", "How many eggs?")], generator_for(model, tokenizer, [first]), tokenizer
    )
    assert kept == []
    assert [r["reason"] for r in rejected] == ["empty"]


def test_answer_without_end_token_is_rejected_as_length(target):
    model, tokenizer = target
    produced = set(greedy_tokens(model, tokenizer, "How many eggs?", 4))
    unused = next(token for token in range(len(tokenizer)) if token not in produced)
    kept, rejected = regenerate_chunk(
        [record("a", "How many eggs?")], generator_for(model, tokenizer, [unused]), tokenizer
    )
    assert kept == []
    assert [r["reason"] for r in rejected] == ["length"]
    assert rejected[0]["record"]["id"] == "a"


def test_truncated_answer_kept_when_configured(target):
    model, tokenizer = target
    produced = set(greedy_tokens(model, tokenizer, "How many eggs?", 4))
    unused = next(token for token in range(len(tokenizer)) if token not in produced)
    settings = RegenConfig(max_new_tokens=4, keep_truncated=True)
    generator = LocalGenerator(model, tokenizer, settings, [unused])
    kept, rejected = regenerate_chunk([record("a", "How many eggs?")], generator, tokenizer)
    assert rejected == []
    assert len(kept) == 1


def test_clean_stop_is_kept_with_text_before_end_token(target):
    model, tokenizer = target
    tokens = greedy_tokens(model, tokenizer, "How many eggs?", 3)
    if tokens[1] == tokens[0]:
        pytest.fail("the tiny target repeated its first token; choose another prompt")
    generator = generator_for(model, tokenizer, [tokens[1]])
    kept, rejected = regenerate_chunk([record("a", "How many eggs?")], generator, tokenizer)
    assert rejected == []
    assistant = kept[0]["messages"][1]
    assert assistant == {"role": "assistant", "content": tokenizer.decode([tokens[0]])}


def test_multi_turn_regenerated_turn_by_turn(target):
    model, tokenizer = target
    settings = RegenConfig(max_new_tokens=3, keep_truncated=True)
    generator = LocalGenerator(model, tokenizer, settings, [tokenizer.mask_token_id])
    kept, rejected = regenerate_chunk([record("a", "First question?", "Second question?")], generator, tokenizer)
    assert rejected == []
    messages = kept[0]["messages"]
    assert [message["role"] for message in messages] == ["user", "assistant", "user", "assistant"]
    alone = generator.generate([render_prompt_ids(tokenizer, messages[:1])])[0]
    assert messages[1]["content"] == alone.text
    second = generator.generate([render_prompt_ids(tokenizer, messages[:3])])[0]
    assert messages[3]["content"] == second.text


def test_prompt_over_limit_rejected_before_generation(target):
    model, tokenizer = target
    short_length = len(render_prompt_ids(tokenizer, [{"role": "user", "content": "Hi?"}]))
    settings = RegenConfig(max_new_tokens=4, max_prompt_tokens=short_length, keep_truncated=True)
    generator = LocalGenerator(model, tokenizer, settings, [tokenizer.mask_token_id])
    long_question = "How many eggs does Janet sell at the market every single day of the week?"
    kept, rejected = regenerate_chunk([record("a", long_question), record("b", "Hi?")], generator, tokenizer)
    assert [r["reason"] for r in rejected] == ["prompt_too_long"]
    assert rejected[0]["id"] == "a"
    assert [k["id"] for k in kept] == ["b"]
