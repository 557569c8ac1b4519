import random
import re

import pytest

from deepspec.data.records import Rejection, normalize_row, split_of

SAY_HI = {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}]}


def normalized(row, source="test"):
    result = normalize_row(row, source)
    assert not isinstance(result, Rejection), result
    return result


def rejection_reason(row):
    result = normalize_row(row, "test")
    assert isinstance(result, Rejection), f"expected a rejection, got {result}"
    return result.reason


def test_messages_row_loads():
    record = normalized(SAY_HI)
    assert record["source"] == "test"
    assert record["messages"] == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}]
    assert re.fullmatch(r"[0-9a-f]{16,24}", record["id"])


def test_text_parts_join_and_keep_id():
    parts = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Say hi"}]},
            {"role": "assistant", "content": "Hi!"},
        ]
    }
    split_parts = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": "Hi!"},
        ]
    }
    assert normalized(parts)["messages"][0]["content"] == "Say hi"
    assert normalized(parts)["id"] == normalized(SAY_HI)["id"]
    assert normalized(split_parts)["id"] == normalized(SAY_HI)["id"]


def test_null_assistant_content_loads():
    row = {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": None}]}
    record = normalized(row)
    assert record["messages"][1] == {"role": "assistant", "content": None}
    assert record["id"] == normalized(SAY_HI)["id"]


def test_sharegpt_speakers_map_to_roles():
    row = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Q1"},
            {"from": "gpt", "value": "A1"},
            {"from": "human", "value": "Q2"},
            {"from": "chatgpt", "value": "A2"},
            {"from": "human", "value": "Q3"},
            {"from": "bing", "value": "A3"},
            {"from": "human", "value": "Q4"},
            {"from": "bard", "value": "A4"},
            {"from": "human", "value": "Q5"},
            {"from": "model", "value": "A5"},
        ]
    }
    roles = [message["role"] for message in normalized(row)["messages"]]
    assert roles == ["system"] + ["user", "assistant"] * 5


def test_conversations_with_role_keys_load():
    row = {"conversations": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}]}
    assert normalized(row)["messages"] == normalized(SAY_HI)["messages"]


def test_turns_alternate_with_empty_answers():
    record = normalized({"turns": ["First question", "Second question"]})
    assert record["messages"] == [
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "Second question"},
        {"role": "assistant", "content": None},
    ]


def test_trailing_user_turn_gets_answer_slot():
    record = normalized({"messages": [{"role": "user", "content": "Q"}]})
    assert record["messages"] == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": None}]


def test_empty_system_message_dropped():
    row = {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "Say hi"}]}
    assert [m["role"] for m in normalized(row)["messages"]] == ["user", "assistant"]


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (["not", "an", "object"], "not_an_object"),
        ("text", "not_an_object"),
        ({"prompt": "no conversation"}, "no_conversation"),
        ({"messages": []}, "empty_conversation"),
        ({"turns": []}, "empty_conversation"),
        ({"messages": [{"role": "system", "content": "Only a system prompt"}]}, "empty_conversation"),
        ({"messages": "Say hi"}, "invalid_messages"),
        ({"messages": ["Say hi"]}, "invalid_messages"),
        (
            {"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Q"}]},
            "starts_with_assistant",
        ),
        (
            {"messages": [{"role": "system", "content": "S"}, {"role": "assistant", "content": "Hi"}]},
            "starts_with_assistant",
        ),
        (
            {"messages": [{"role": "user", "content": "Q1"}, {"role": "user", "content": "Q2"}]},
            "consecutive_user_turns",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "Q"},
                    {"role": "assistant", "content": "A"},
                    {"role": "assistant", "content": "B"},
                ]
            },
            "consecutive_assistant_turns",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "Q"},
                    {"role": "assistant", "content": "A"},
                    {"role": "system", "content": "S"},
                ]
            },
            "system_not_first",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "unknown_role"),
        ({"conversations": [{"from": "narrator", "value": "x"}]}, "unknown_role"),
        ({"messages": [{"role": "user", "content": ""}]}, "empty_user_content"),
        ({"messages": [{"role": "user", "content": "  \n"}]}, "empty_user_content"),
        ({"messages": [{"role": "user", "content": None}]}, "empty_user_content"),
        ({"turns": [""]}, "empty_user_content"),
        ({"turns": [3]}, "invalid_content"),
        ({"messages": [{"role": "user", "content": 42}]}, "invalid_content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "non_text_content",
        ),
    ],
)
def test_unusable_row_rejected_with_reason(row, reason):
    assert rejection_reason(row) == reason


def test_rejection_keeps_row_and_detail():
    row = {"messages": [{"role": "user", "content": "Q1"}, {"role": "user", "content": "Q2"}]}
    result = normalize_row(row, "test")
    assert isinstance(result, Rejection)
    assert result.row == row
    assert "0 and 1" in result.detail


def test_id_ignores_assistant_text():
    other_answer = {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hello."}]}
    assert normalized(other_answer)["id"] == normalized(SAY_HI)["id"]


def test_id_ignores_source_name():
    assert normalized(SAY_HI, "a")["id"] == normalized(SAY_HI, "b")["id"]


def test_id_depends_on_user_and_system_turns():
    other_question = {"messages": [{"role": "user", "content": "Say bye"}]}
    with_system = {"messages": [{"role": "system", "content": "Be brief."}, *SAY_HI["messages"]]}
    ids = {normalized(SAY_HI)["id"], normalized(other_question)["id"], normalized(with_system)["id"]}
    assert len(ids) == 3


def test_turns_and_messages_share_id():
    assert normalized({"turns": ["Say hi"]})["id"] == normalized(SAY_HI)["id"]


def record_ids(count):
    return [normalized({"turns": [f"question number {index}"]})["id"] for index in range(count)]


def test_split_independent_of_order_and_slicing():
    ids = record_ids(400)
    expected = {rid: split_of(rid, 0.25, "salt") for rid in ids}

    shuffled = list(ids)
    random.Random(7).shuffle(shuffled)
    from_shuffled = {rid: split_of(rid, 0.25, "salt") for rid in shuffled}

    from_slices = {}
    for part in (ids[::2], ids[1::2]):
        from_slices.update({rid: split_of(rid, 0.25, "salt") for rid in part})

    assert from_shuffled == expected
    assert from_slices == expected


def test_split_fraction_close_to_setting():
    ids = record_ids(4000)
    heldout = sum(split_of(rid, 0.2, "salt") == "heldout" for rid in ids)
    assert 0.17 < heldout / len(ids) < 0.23


def test_split_changes_with_salt():
    ids = record_ids(200)
    first = [split_of(rid, 0.5, "one") for rid in ids]
    second = [split_of(rid, 0.5, "two") for rid in ids]
    assert first != second


def test_split_rejects_invalid_fraction():
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_of("abc", 1.5, "salt")
