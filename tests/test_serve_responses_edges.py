"""Responses-schema edges a mutation sweep of ``flyer.serve.responses_schema`` found unpinned: OpenAI's bounds on
sampling and logprobs, tools and a named tool_choice that need a name, the metadata's 16 keys, the part kinds each
role takes, calls joined to the assistant message, and listed input items the official client's own types
(``ResponseItemList``) read."""

import pytest
from openai.types.responses import ResponseItemList

from flyer.errors import FieldError
from flyer.serve.responses_schema import ResponsesBody, input_items, input_messages



def _body(**over) -> ResponsesBody:
    return ResponsesBody.model_validate({"model": "m", "input": "x", **over})


def _refused(field: str, **over) -> None:
    with pytest.raises((FieldError, ValueError)) as e:  # pydantic's ValidationError is a ValueError
        _body(**over).check_fields()
    got = e.value.field if isinstance(e.value, FieldError) else ".".join(str(x) for x in e.value.errors()[0]["loc"])
    assert got == field


def test_sampling_and_logprob_bounds_are_openais():
    _body(top_p=1.0, top_logprobs=20, include=["message.output_text.logprobs"]).check_fields()
    _refused("top_p", top_p=0.0)  # (0, 1]: 0 is no distribution
    _body(temperature=2.0, max_output_tokens=1).check_fields()
    _refused("temperature", temperature=2.5)
    _refused("max_output_tokens", max_output_tokens=0)
    _refused("top_logprobs", top_logprobs=21, include=["message.output_text.logprobs"])


def test_tools_and_tool_choice_need_a_name():
    tool = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    _body(tools=[tool], tool_choice={"type": "function", "name": "f"}).check_fields()
    _refused("tools[0].name", tools=[{**tool, "name": ""}])
    _refused("tool_choice", tools=[tool], tool_choice={"type": "function"})


def test_metadata_takes_exactly_16_keys_and_generate_summary_is_refused():
    _body(metadata={f"k{i}": "v" for i in range(16)}).check_fields()
    _refused("reasoning.summary", reasoning={"generate_summary": "auto"})


def test_part_kinds_follow_the_role():
    for role in ("user", "system", "developer"):
        input_messages([{"role": role, "content": [{"type": "input_text", "text": "a"}]}])
        with pytest.raises(FieldError, match=r"^input\[0\]\.content"):
            input_messages([{"role": role, "content": [{"type": "output_text", "text": "a"}]}])


def test_calls_join_the_assistant_message_and_origins_name_their_items():
    items = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "let me"},
             {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
             {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
             {"type": "function_call_output", "call_id": "c1", "output": "1"}]
    origins = []
    msgs = input_messages(items, origins)
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool"]
    assert [c["id"] for c in msgs[1]["tool_calls"]] == ["c1", "c2"]
    assert origins == [(0, []), (1, [2, 3]), (4, [])]
    origins = []
    input_messages(items[2:4], origins)  # calls without a message before: one opened, of calls only
    assert origins == [(None, [0, 1])]


def test_input_item_errors_name_the_field():
    with pytest.raises(FieldError) as e:
        input_messages([{"type": "function_call", "call_id": "c1", "name": "f"}])
    assert e.value.field == "input[0].arguments"
    # an item without a type is a message
    assert input_messages([{"role": "user", "content": "a"}]) == [{"role": "user", "content": "a"}]


def test_input_items_read_as_the_clients_types():
    ids = iter(range(100))
    items = [{"role": "user", "content": "q"},
             {"role": "assistant", "content": "a", "id": "msg_1", "status": "incomplete"},
             {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
             {"type": "function_call_output", "call_id": "c1", "output": "1"},
             {"type": "reasoning", "id": "rs_sent", "summary": [{"type": "summary_text", "text": "s"}]}]
    listed = input_items(items, lambda prefix: f"{prefix}_{next(ids)}")
    page = ResponseItemList.model_validate({"object": "list", "data": listed, "first_id": listed[0]["id"],
                                            "last_id": listed[-1]["id"], "has_more": False})
    assert page.data[1].id == "msg_1" and page.data[1].status == "incomplete"
    assert page.data[1].content[0].type == "output_text" and page.data[1].content[0].annotations == []
    assert listed[1]["content"][0]["annotations"] == []
    assert page.data[4].id == "rs_sent" and page.data[4].summary[0].text == "s"


@pytest.mark.parametrize("item,field", [
    ({"type": ["message"], "role": "user", "content": "q"}, "input[0].type"),  # no key of the kinds (unhashable)
    ({"type": {"a": 1}}, "input[0].type"),
    ({"role": "user", "content": "q", "id": [1]}, "input[0].id"),
    ({"role": "user", "content": "q", "id": 5}, "input[0].id"),  # listed back, no client reads it, no after names it
    ({"type": "reasoning", "id": {}}, "input[0].id"),
    ({"type": "function_call_output", "call_id": "c", "output": "1", "id": ""}, "input[0].id"),
    ({"role": "user", "content": "q", "status": "done"}, "input[0].status"),
])
def test_an_items_type_id_and_status_are_openais(item, field):
    """A kind or id that is no string answered 500 (a list looked up as a key); an int id was stored and listed
    back as one."""
    with pytest.raises(FieldError) as e:
        input_messages([item])
    assert e.value.field == field


def test_items_sent_without_an_id_get_their_own():
    ids = iter(range(100))
    items = [{"role": "user", "content": "q", "id": None}, {"type": "reasoning", "id": None},
             {"role": "user", "content": "r", "status": None}]
    input_messages(items)
    listed = input_items(items, lambda prefix: f"{prefix}_{next(ids)}")
    assert [i["id"] for i in listed] == ["msg_0", "rs_1", "msg_2"] and "status" in listed[2]


def test_response_format_leaves_out_the_unset_keys():
    body = _body(text={"format": {"type": "json_schema", "name": "n", "schema": {"type": "object"}}})
    assert body.response_format() == {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}}}
