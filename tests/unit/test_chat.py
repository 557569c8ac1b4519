import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from deepspec.data.chat import (
    ChatTemplateError,
    TrainingExample,
    render_chat_text,
    render_prompt_ids,
    render_training_example,
    shift_left,
)
from deepspec.data.records import Rejection

QWEN_STYLE_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + (message['content'] or '') "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}"
)

# Like Qwen3's template: an empty think block sits in front of the answer after the last user turn only,
# and the generation prompt carries it when thinking is disabled.
THINK_TEMPLATE = (
    "{% set ns = namespace(last_user=0) %}"
    "{% for message in messages %}{% if message['role'] == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}"
    "{% endfor %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' and loop.index0 > ns.last_user %}"
    "{{'<|im_start|>assistant\n<think>\n\n</think>\n\n' + message['content'] + '<|im_end|>\n'}}"
    "{% else %}{{'<|im_start|>' + message['role'] + '\n' + (message['content'] or '') + '<|im_end|>\n'}}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{'<think>\n\n</think>\n\n'}}{% endif %}"
    "{% endif %}"
)

# The generation prompt opens a block that rendered answers do not have.
MISMATCHED_PROMPT_TEMPLATE = QWEN_STYLE_TEMPLATE.replace(
    "{{'<|im_start|>assistant\n'}}{% endif %}", "{{'<|im_start|>assistant\n<plan>'}}{% endif %}"
)

# Answers are never rendered, so a non-empty answer covers no token.
ANSWERLESS_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{'<|im_start|>assistant\n'}}"
    "{% else %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}"
)

CORPUS = [
    "Say hi to everyone in the room and then answer the question about numbers.",
    "How many eggs does Janet sell every day at the market? She has sixteen eggs.",
    "Write a python function that returns the sum of a list of numbers.",
    "Hi! Hello there. The answer is 42 because six times seven is forty-two.",
]


def build_tokenizer(template):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=template,
        name_or_path="toy-bpe",
    )


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(QWEN_STYLE_TEMPLATE)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def masked_text(tokenizer, example):
    return tokenizer.decode(
        [t for t, m in zip(example.input_ids, example.loss_mask, strict=False) if m], skip_special_tokens=False
    )


def unmasked_text(tokenizer, example):
    return tokenizer.decode(
        [t for t, m in zip(example.input_ids, example.loss_mask, strict=False) if not m], skip_special_tokens=False
    )


def train(tokenizer, messages, **kwargs):
    result = render_training_example(tokenizer, messages, kwargs.pop("max_length", 512), **kwargs)
    assert isinstance(result, TrainingExample), result
    return result


def test_prompt_ids_use_template_without_system_prompt(tokenizer):
    ids = render_prompt_ids(tokenizer, [user("Say hi")])
    text = tokenizer.decode(ids, skip_special_tokens=False)
    assert text == "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_prompt_ids_keep_given_system_message(tokenizer):
    ids = render_prompt_ids(tokenizer, [{"role": "system", "content": "Be brief."}, user("Say hi")])
    assert tokenizer.decode(ids, skip_special_tokens=False).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_mask_covers_answer_and_end_of_turn(tokenizer):
    example = train(tokenizer, [user("Say hi"), assistant("Hi!")])
    assert masked_text(tokenizer, example) == "Hi!<|im_end|>\n"
    assert unmasked_text(tokenizer, example) == "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"
    assert len(example.input_ids) == len(example.loss_mask)


def test_mask_starts_where_prompt_ids_end(tokenizer):
    messages = [user("Say hi"), assistant("Hi! Hello there.")]
    example = train(tokenizer, messages)
    prompt = render_prompt_ids(tokenizer, messages[:1])
    first_supervised = example.loss_mask.index(1)
    assert example.input_ids[: len(prompt)] == prompt
    assert first_supervised == len(prompt)
    assert all(example.loss_mask[first_supervised:])


def test_mask_covers_every_assistant_turn(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        user("How many eggs?"),
        assistant("Sixteen eggs."),
        user("And the sum?"),
        assistant("The answer is 42."),
    ]
    example = train(tokenizer, messages)
    assert masked_text(tokenizer, example) == "Sixteen eggs.<|im_end|>\nThe answer is 42.<|im_end|>\n"
    spans = sum(
        1 for before, now in zip([0] + example.loss_mask, example.loss_mask, strict=False) if now and not before
    )
    assert spans == 2


def test_empty_answer_supervises_end_of_turn(tokenizer):
    example = train(tokenizer, [user("Say hi"), assistant("")])
    assert masked_text(tokenizer, example) == "<|im_end|>\n"


def test_history_rewriting_template_masks_every_answer():
    tokenizer = build_tokenizer(THINK_TEMPLATE)
    messages = [user("Say hi"), assistant("Hi!"), user("How many eggs?"), assistant("Sixteen.")]
    full = render_chat_text(tokenizer, messages, add_generation_prompt=False)
    assert full.count("<think>") == 1
    example = train(tokenizer, messages)
    assert masked_text(tokenizer, example) == "Hi!<|im_end|>\nSixteen.<|im_end|>\n"
    assert "<think>" in unmasked_text(tokenizer, example)


def test_think_block_of_generation_prompt_not_supervised():
    tokenizer = build_tokenizer(THINK_TEMPLATE)
    messages = [user("Say hi"), assistant("Hi!")]
    prompt = render_prompt_ids(tokenizer, messages[:1])
    example = train(tokenizer, messages)
    assert tokenizer.decode(prompt, skip_special_tokens=False).endswith("<think>\n\n</think>\n\n")
    assert example.input_ids[: len(prompt)] == prompt
    assert masked_text(tokenizer, example) == "Hi!<|im_end|>\n"


def test_generation_prompt_mismatch_raises_naming_template():
    tokenizer = build_tokenizer(MISMATCHED_PROMPT_TEMPLATE)
    with pytest.raises(ChatTemplateError, match="toy-bpe"):
        render_training_example(tokenizer, [user("Say hi"), assistant("Hi!")], 512)


def test_answer_without_tokens_raises():
    tokenizer = build_tokenizer(ANSWERLESS_TEMPLATE)
    with pytest.raises(ChatTemplateError, match="covers no token"):
        render_training_example(tokenizer, [user("Say hi"), assistant("Hi!")], 512)


def long_question(tokenizer, min_tokens):
    words = []
    while len(render_prompt_ids(tokenizer, [user(" ".join(words))])) < min_tokens:
        words.append("numbers")
    return " ".join(words)


def test_overlong_dropped(tokenizer):
    question = long_question(tokenizer, 60)
    result = render_training_example(tokenizer, [user(question), assistant("Hi!")], 32, overlong="drop")
    assert isinstance(result, Rejection)
    assert result.reason == "too_long"


def test_overlong_single_turn_rejected_even_truncating(tokenizer):
    question = long_question(tokenizer, 60)
    result = render_training_example(tokenizer, [user(question), assistant("Hi!")], 32, overlong="truncate_left")
    assert isinstance(result, Rejection)
    assert result.reason == "too_long"


def test_truncate_left_removes_whole_leading_turns(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        user(long_question(tokenizer, 60)),
        assistant("Sixteen eggs."),
        user("And the sum?"),
        assistant("The answer is 42."),
    ]
    example = train(tokenizer, messages, max_length=48, overlong="truncate_left")
    text = tokenizer.decode(example.input_ids, skip_special_tokens=False)
    assert len(example.input_ids) <= 48
    assert example.dropped_messages == 2
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAnd the sum?")
    assert masked_text(tokenizer, example) == "The answer is 42.<|im_end|>\n"


def test_too_few_loss_tokens_rejected(tokenizer):
    result = render_training_example(tokenizer, [user("Say hi"), assistant("Hi!")], 512, min_loss_tokens=50)
    assert isinstance(result, Rejection)
    assert result.reason == "too_few_loss_tokens"


def test_missing_answer_rejected(tokenizer):
    result = render_training_example(tokenizer, [user("Say hi"), assistant(None)], 512)
    assert isinstance(result, Rejection)
    assert result.reason == "missing_answer"


def test_conversation_without_answer_rejected(tokenizer):
    result = render_training_example(tokenizer, [user("Say hi")], 512)
    assert isinstance(result, Rejection)
    assert result.reason == "no_assistant_turn"


def test_invalid_overlong_setting_raises(tokenizer):
    with pytest.raises(ValueError, match="overlong"):
        render_training_example(tokenizer, [user("Say hi"), assistant("Hi!")], 512, overlong="truncate_right")


def test_shift_left_list():
    assert shift_left([0, 0, 0, 1, 1, 1, 1]) == [0, 0, 1, 1, 1, 1, 0]
    assert shift_left([]) == []


def test_shift_left_tensor():
    mask = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    assert shift_left(mask).tolist() == [0, 0, 1, 1, 1, 1, 0]
    batch = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1, 1, 0, 0, 0, 1, 0]])
    assert shift_left(batch).tolist() == [[0, 0, 1, 1, 1, 1, 0], [1, 0, 0, 0, 1, 0, 0]]
    assert mask.tolist() == [0, 0, 0, 1, 1, 1, 1]
