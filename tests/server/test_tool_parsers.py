"""jserve.server.tool_calls: tools/tool_choice checks, constraint schemas, hermes/llama3_json parsers, streaming."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest

from jserve.server.tool_calls import (
    TOOL_PARSERS,
    ConstrainedToolStream,
    HermesToolParser,
    Llama3JsonToolParser,
    ToolStream,
    assistant_message,
    chat_finish_reason,
    extract_tool_calls,
    get_tool_parser,
    make_tool_call_id,
    new_tool_stream,
    resolve_tool_choice,
    tool_choice_json_schema,
    validate_tools,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
TOOLS = [WEATHER, TIME]


def _hermes(name: str, args: dict) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"


def _names_args(calls: list[dict]) -> list[tuple[str, str]]:
    return [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


def _reassemble(deltas: list[dict]) -> tuple[str | None, list[tuple[str, str]]]:
    """Rebuilds (content, [(name, arguments)]) from chunk deltas the way an OpenAI client accumulates them,
    checking each call's header (id, name, empty arguments) comes before its fragments, indexes in order."""
    content, calls = [], []
    for delta in deltas:
        assert set(delta) <= {"content", "tool_calls"} and len(delta) == 1
        if "content" in delta:
            assert delta["content"]
            content.append(delta["content"])
            continue
        (entry,) = delta["tool_calls"]
        if "id" in entry:
            assert entry["index"] == len(calls) and re.fullmatch(r"call_[0-9a-f]{24}", entry["id"])
            assert entry["type"] == "function" and entry["function"]["arguments"] == ""
            calls.append([entry["function"]["name"], ""])
        else:
            assert entry["index"] == len(calls) - 1 and set(entry["function"]) == {"arguments"}
            calls[entry["index"]][1] += entry["function"]["arguments"]
    return "".join(content) or None, [tuple(c) for c in calls]


def _stream(stream: ToolStream, pieces: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    deltas = [d for piece in pieces for d in stream.feed(piece)] + stream.finish()
    result = _reassemble(deltas)
    assert _names_args(stream.tool_calls) == result[1] and (stream.content or None) == result[0]
    return result


def _chunkings(text: str, seed: int = 0, random_ones: int = 20):
    """Every two-piece split, one piece per character, and a few random chunkings (with empty deltas)."""
    yield [text]
    yield list(text)
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    rng = random.Random(seed)
    for _ in range(random_ones):
        cuts = sorted(rng.randint(0, len(text)) for _ in range(rng.randint(1, 8)))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def _assert_stream_matches(make, text: str, expected: tuple[str | None, list[dict]]) -> None:
    want = (expected[0], _names_args(expected[1]))
    for pieces in _chunkings(text, seed=len(text)):
        assert _stream(make(), pieces) == want, pieces


# ---------------------------------------------------------------------------------------------------- hermes


def test_hermes_single_call_and_arguments_keep_non_ascii():
    content, calls = HermesToolParser().extract(_hermes("get_weather", {"city": "Zürich"}))
    assert content is None
    assert _names_args(calls) == [("get_weather", '{"city": "Zürich"}')]
    assert re.fullmatch(r"call_[0-9a-f]{24}", calls[0]["id"]) and calls[0]["type"] == "function"


def test_hermes_leading_content_and_several_calls():
    text = "Let me check.\n" + _hermes("get_weather", {"city": "Oslo"}) + "\n" + _hermes("get_time", {})
    content, calls = HermesToolParser().extract(text)
    assert content == "Let me check.\n"
    assert _names_args(calls) == [("get_weather", '{"city": "Oslo"}'), ("get_time", "{}")]
    assert len({c["id"] for c in calls}) == 2


def test_hermes_unclosed_last_call_text_between_dropped_and_string_arguments():
    text = _hermes("a", {}) + " chatter " + '<tool_call>{"name": "b", "arguments": "{\\"x\\": 1}"}'
    assert _names_args(HermesToolParser().extract(text)[1]) == [("a", "{}"), ("b", '{"x": 1}')]


@pytest.mark.parametrize(
    "text",
    [
        "Sure <tool_call>{not json}</tool_call>",
        _hermes("a", {}) + "<tool_call>{broken",  # the cut-short second call spoils the whole output
        '<tool_call>{"arguments": {}}</tool_call>',  # no name
        '<tool_call>{"name": "a", "arguments": [1]}</tool_call>',
        "<tool_call>",
    ],
)
def test_hermes_invalid_call_makes_whole_output_content(text):
    assert HermesToolParser().extract(text) == (text, [])


def test_hermes_plain_text():
    assert HermesToolParser().extract("no tools <tool here") == ("no tools <tool here", [])
    assert HermesToolParser().extract("") == (None, [])


HERMES_STREAM_CASES = [
    "",
    "plain answer, a < sign and <tool but no call <tool_cal",
    _hermes("get_weather", {"city": "Zürich", "unit": "c"}),
    "Checking both.\n\n" + _hermes("get_weather", {"city": 'a}b"c'}) + "\n" + _hermes("get_time", {}) + "\n",
    _hermes("a", {"s": "</tool_call"}) + '<tool_call>{"name": "b", "arguments": {"k": [1, {"z": null}]}}',
    "Hmm <tool_call>{oops}</tool_call> after " + _hermes("a", {}),  # bad first call: everything is content
    "<tool_call>" + '{"name": "a"',  # cut short before any call completed
]


@pytest.mark.parametrize("text", HERMES_STREAM_CASES)
def test_hermes_stream_matches_extract_at_every_split(text):
    _assert_stream_matches(HermesToolParser, text, HermesToolParser().extract(text))


def test_hermes_stream_holds_a_possible_tag_and_releases_it():
    parser = HermesToolParser()
    assert parser.feed("Hi <tool") == [{"content": "Hi "}]
    assert parser.feed("box") == [{"content": "<toolbox"}]
    assert parser.feed(" <") == [{"content": " "}]
    assert parser.finish() == [{"content": "<"}]


def test_hermes_stream_sends_a_call_when_its_tag_closes():
    parser = HermesToolParser()
    assert parser.feed('<tool_call>{"name": "a", "arguments": {"x": 1}}') == []
    header, args = parser.feed("</tool_call>")
    assert header["tool_calls"][0]["function"] == {"name": "a", "arguments": ""}
    assert args == {"tool_calls": [{"index": 0, "function": {"arguments": '{"x": 1}'}}]}
    assert parser.finish() == []


def test_hermes_stream_drops_a_bad_call_after_a_good_one():
    """The documented gap: extract falls back to content, a stream cannot recall the call it sent."""
    text = _hermes("a", {}) + "<tool_call>{bad}</tool_call>" + _hermes("b", {})
    assert HermesToolParser().extract(text) == (text, [])
    assert _stream(HermesToolParser(), list(text)) == (None, [("a", "{}"), ("b", "{}")])


# ---------------------------------------------------------------------------------------------------- llama3_json


@pytest.mark.parametrize("tag", ["", "<|python_tag|>", "  <|python_tag|>\n "])
def test_llama3_single_call(tag):
    content, calls = Llama3JsonToolParser().extract(tag + '{"name": "get_weather", "parameters": {"city": "Köln"}}')
    assert content is None and _names_args(calls) == [("get_weather", '{"city": "Köln"}')]


def test_llama3_several_calls_and_arguments_key():
    text = '{"name": "a", "parameters": {"x": 1}}; {"name": "b", "arguments": {}};'
    assert _names_args(Llama3JsonToolParser().extract(text)[1]) == [("a", '{"x": 1}'), ("b", "{}")]


@pytest.mark.parametrize(
    "text",
    [
        "The weather is nice.",
        'Calling {"name": "a", "parameters": {}}',  # does not start with "{"
        "<|python_tag|>print(1)",
        "   ",
    ],
)
def test_llama3_plain_content(text):
    assert Llama3JsonToolParser().extract(text) == (text, [])


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "a", "parameters": {}',  # cut short
        '{"name": "a", "parameters": {}} and then text',
        '{"name": "a", "parameters": {}}; {"name": 3}',
        '{"parameters": {}}',
        '<|python_tag|>{"name": "a", "parameters": {}}; nope',
    ],
)
def test_llama3_invalid_json_makes_whole_output_content(text):
    assert Llama3JsonToolParser().extract(text) == (text, [])


LLAMA_STREAM_CASES = [
    "",
    "Plain text with { braces } and <|python",
    "<|python_tag|>",
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "a;b}\\"", "n": [1, 2]}}',
    ' {"name": "a", "parameters": {}} ; {"name": "b", "arguments": {"q": "Ω"}};\n',
    '{"name": "a", "parameters": {"x": ',  # cut short: content
    '{"name": "a"} junk',  # not a call sequence: content
]


@pytest.mark.parametrize("text", LLAMA_STREAM_CASES)
def test_llama3_stream_matches_extract_at_every_split(text):
    _assert_stream_matches(Llama3JsonToolParser, text, Llama3JsonToolParser().extract(text))


def test_llama3_stream_holds_until_the_output_kind_is_known():
    parser = Llama3JsonToolParser()
    assert parser.feed(" <|python_") == []
    assert parser.feed("tag|>") == []
    assert parser.feed('{"name": "a", "parameters": {}}') == []  # text after it could still make it content
    assert parser.feed(" ;")[0]["tool_calls"][0]["function"]["name"] == "a"
    assert parser.feed('{"name": "b", "parameters": {}}') == []
    assert parser.finish()[0]["tool_calls"][0]["function"]["name"] == "b"
    assert Llama3JsonToolParser().feed(" <|pyx") == [{"content": " <|pyx"}]


def test_llama3_stream_drops_a_bad_call_after_a_sent_one():
    """The documented gap: a call goes out at its ``;``, so what follows cannot turn it back into content."""
    text = '{"name": "a", "parameters": {}}; oops'
    assert Llama3JsonToolParser().extract(text) == (text, [])
    assert _stream(Llama3JsonToolParser(), [text]) == (None, [("a", "{}")])


def test_registry_and_unknown_parser():
    assert TOOL_PARSERS["hermes"] is HermesToolParser and TOOL_PARSERS["llama3_json"] is Llama3JsonToolParser
    assert get_tool_parser("llama4_json")().extract('{"name": "a"}')[1][0]["function"]["arguments"] == "{}"
    with pytest.raises(ValueError, match=r"unknown tool call parser 'mistral'; known: hermes, llama3_json"):
        get_tool_parser("mistral")
    assert HermesToolParser.needs_special_tokens and not Llama3JsonToolParser.needs_special_tokens


# ---------------------------------------------------------------------------------------------------- request side


def test_defaults_and_normalization():
    assert resolve_tool_choice(None).mode == "none"
    assert resolve_tool_choice([]).mode == "none"
    assert resolve_tool_choice([], "auto").mode == "none"
    choice = resolve_tool_choice(TOOLS)
    assert choice.mode == "auto" and not choice.constrained
    assert choice.tools[1] == {
        "type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
    }
    assert resolve_tool_choice(TOOLS, "none").json_schema() is None
    assert tool_choice_json_schema(choice) is None


@pytest.mark.parametrize(
    ("tools", "tool_choice", "field"),
    [
        ("x", None, r"^tools: "),
        ([5], None, r"^tools\[0\]: "),
        ([{"type": "code", "function": {"name": "a"}}], None, r"^tools\[0\]\.type: "),
        ([{"type": "function"}], None, r"^tools\[0\]\.function: "),
        ([TIME, {"type": "function", "function": {"name": ""}}], None, r"^tools\[1\]\.function\.name: "),
        ([{"type": "function", "function": {"name": "a b"}}], None, r"^tools\[0\]\.function\.name: "),
        ([{"type": "function", "function": {"name": "a" * 65}}], None, r"^tools\[0\]\.function\.name: "),
        ([TIME, TIME], None, r"^tools\[1\]\.function\.name: duplicate"),
        ([{"type": "function", "function": {"name": "a", "parameters": []}}], None, r"^tools\[0\]\.function\.param"),
        (
            [{"type": "function", "function": {"name": "a", "parameters": {"type": "string"}}}],
            None,
            r"^tools\[0\]\.function\.parameters\.type: ",
        ),
        ([{"type": "function", "function": {"name": "a", "description": 1}}], None, r"\.description: "),
        ([{"type": "function", "function": {"name": "a", "strict": "yes"}}], None, r"\.strict: "),
        (TOOLS, "always", r"^tool_choice: "),
        (None, "required", r"^tool_choice: "),
        ([], "required", r"^tool_choice: "),
        (None, {"type": "function", "function": {"name": "get_time"}}, r"^tool_choice: "),
        (TOOLS, {"type": "function", "function": {"name": "nope"}}, r"^tool_choice\.function\.name: 'nope'"),
        (TOOLS, {"type": "function", "function": {}}, r"^tool_choice\.function\.name: "),
        (TOOLS, {"type": "tool"}, r"^tool_choice: "),
    ],
)
def test_invalid_tools_and_tool_choice_name_the_field(tools, tool_choice, field):
    with pytest.raises(ValueError, match=field):
        resolve_tool_choice(tools, tool_choice)


def test_validate_tools_copies_its_input():
    checked = validate_tools([WEATHER])
    checked[0]["function"]["parameters"]["properties"]["x"] = {}
    assert "x" not in WEATHER["function"]["parameters"]["properties"]


def test_named_function_schema_is_its_parameters():
    choice = resolve_tool_choice(TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    schema = tool_choice_json_schema(choice)
    assert choice.constrained and schema == WEATHER["function"]["parameters"]
    jsonschema.validate({"city": "Oslo", "unit": "c"}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"unit": "c"}, schema)


def test_required_schema_accepts_calls_and_rejects_the_rest():
    schema = tool_choice_json_schema(resolve_tool_choice(TOOLS, "required"))
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "Oslo"}}], schema)
    jsonschema.validate([{"name": "get_time", "parameters": {}}, {"name": "get_time", "parameters": {"x": 1}}], schema)
    for bad in (
        [],
        [{"name": "get_weather", "parameters": {}}],  # missing the required city
        [{"name": "other", "parameters": {}}],
        [{"name": "get_time"}],
        [{"name": "get_time", "parameters": {}, "extra": 1}],
        {"name": "get_time", "parameters": {}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def _tool_with_defs(name: str, definition: dict) -> dict:
    params = {"type": "object", "properties": {"p": {"$ref": "#/$defs/Point"}}, "$defs": {"Point": definition}}
    return {"type": "function", "function": {"name": name, "parameters": params}}


def test_required_schema_hoists_defs_so_refs_resolve():
    point = {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}
    schema = tool_choice_json_schema(resolve_tool_choice([_tool_with_defs("a", point)], "required"))
    assert schema["$defs"] == {"Point": point}
    jsonschema.validate([{"name": "a", "parameters": {"p": {"x": 1}}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "a", "parameters": {"p": {}}}], schema)
    conflicting = [_tool_with_defs("a", point), _tool_with_defs("b", {"type": "string"})]
    with pytest.raises(ValueError, match=r"^tools\[1\]\.function\.parameters\.\$defs\.Point: "):
        tool_choice_json_schema(resolve_tool_choice(conflicting, "required"))


# ---------------------------------------------------------------------------------------------------- constrained


def test_named_stream_sends_header_first_then_text_as_it_comes():
    choice = resolve_tool_choice(TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    stream = ConstrainedToolStream(choice)
    (header,) = stream.feed(" \n")
    assert header["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert stream.feed('{"city": ') == [{"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}]
    assert stream.feed('"Oslo"} ') == [{"tool_calls": [{"index": 0, "function": {"arguments": ' "Oslo"}'}}]}]
    assert stream.finish() == []


@pytest.mark.parametrize("text", ['{"city": "Zürich", "unit": "f"}', '  {"city": "a  b" }\n\n', ""])
def test_named_stream_matches_extract(text):
    choice = resolve_tool_choice(TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    content, calls = extract_tool_calls(choice, None, text)
    assert content is None and _names_args(calls) == [("get_weather", text.strip())]
    _assert_stream_matches(lambda: ConstrainedToolStream(choice), text, (content, calls))


REQUIRED_CASES = [
    '[{"name": "get_weather", "parameters": {"city": "]\\"}"}}, {"name": "get_time", "parameters": {}}]',
    ' [ {"name": "get_time", "parameters": {"tz": "Ω"}} ]\n',
    '[{"name": "get_time", "parameters": {}}, {"name": "get_weather", "parame',  # cut short: first call kept
    "",
    "not an array",
]


@pytest.mark.parametrize("text", REQUIRED_CASES)
def test_required_stream_matches_extract(text):
    choice = resolve_tool_choice(TOOLS, "required")
    expected = extract_tool_calls(choice, "hermes", text)
    _assert_stream_matches(lambda: ConstrainedToolStream(choice), text, expected)


def test_required_extract_and_calls_go_out_when_elements_close():
    choice = resolve_tool_choice(TOOLS, "required")
    content, calls = extract_tool_calls(choice, None, REQUIRED_CASES[0])
    assert content is None
    assert _names_args(calls) == [("get_weather", '{"city": "]\\"}"}'), ("get_time", "{}")]
    assert extract_tool_calls(choice, None, "not an array") == ("not an array", [])
    stream = ConstrainedToolStream(choice)
    assert stream.feed('[{"name": "get_time", "parameters": {}') == []
    assert len(stream.feed("}")) == 2


# ---------------------------------------------------------------------------------------------------- wiring


def test_new_tool_stream_and_extract_dispatch():
    auto, none = resolve_tool_choice(TOOLS), resolve_tool_choice(TOOLS, "none")
    assert isinstance(new_tool_stream(auto, "hermes"), HermesToolParser)
    assert new_tool_stream(auto, None) is None and new_tool_stream(none, "hermes") is None
    assert isinstance(new_tool_stream(resolve_tool_choice(TOOLS, "required"), None), ConstrainedToolStream)
    text = _hermes("get_time", {})
    assert extract_tool_calls(none, "hermes", text) == (text, [])
    assert _names_args(extract_tool_calls(auto, "hermes", text)[1]) == [("get_time", "{}")]
    with pytest.raises(ValueError, match="unknown tool call parser"):
        new_tool_stream(auto, "nope")


def test_finish_reason_and_message():
    call = {"id": make_tool_call_id(), "type": "function", "function": {"name": "a", "arguments": "{}"}}
    auto, named = (
        resolve_tool_choice(TOOLS),
        resolve_tool_choice(TOOLS, {"type": "function", "function": TIME["function"]}),
    )
    assert chat_finish_reason(auto, "stop", [call]) == "tool_calls"
    assert chat_finish_reason(resolve_tool_choice(TOOLS, "required"), "stop", [call]) == "tool_calls"
    assert chat_finish_reason(auto, "stop", []) == "stop"
    assert chat_finish_reason(auto, "length", [call]) == "length"
    assert chat_finish_reason(named, "stop", [call]) == "stop"
    assert chat_finish_reason(auto, None, [call]) is None
    assert assistant_message(None, [call]) == {"role": "assistant", "content": None, "tool_calls": [call]}
    assert assistant_message("hi", []) == {"role": "assistant", "content": "hi"}
