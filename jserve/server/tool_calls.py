"""OpenAI tool calling without the server: request checks, constraint schemas, and output parsers (vLLM's names).

Three ways a chat completion can produce tool calls, picked by ``tool_choice``:

* ``{"type": "function", "function": {"name": N}}`` (named) and ``"required"`` constrain decoding with the JSON
  schema from :func:`tool_choice_json_schema`, so the output is machine-readable by construction and is turned into
  calls by :class:`ConstrainedToolStream` (streaming) or :func:`extract_tool_calls` (whole output).
* ``"auto"`` lets the model write free text in its own tool-call format, read back by the parser that
  ``--tool-call-parser`` names (:data:`TOOL_PARSERS`: ``hermes``, ``llama3_json``/``llama4_json``).
* ``"none"`` leaves the output alone.

Every stream object is made per choice and fed text *deltas* (what the detokenizer yields), returning a list of
OpenAI chat-completion-chunk ``delta`` dicts, one chunk each: ``{"content": ...}``, a tool-call header
``{"tool_calls": [{"index", "id", "type", "function": {"name", "arguments": ""}}]}`` and argument fragments
``{"tool_calls": [{"index", "function": {"arguments": ...}}]}``. ``finish()`` flushes what was held back. The
``auto`` parsers send a call (header, then its arguments as one fragment) once the call's JSON is complete (a
parser that re-serializes the arguments cannot send a prefix safely): hermes at ``</tool_call>``, llama3_json at
the ``;`` after the object or at the end of the output, since text after it would make the output content. The
named-function stream forwards argument text as it is generated; ``required`` sends each array element's call
when the element closes.

Kept invariant, tested at every split point: the concatenated streamed content equals the whole-output content,
and the concatenated argument fragments of each call equal its ``arguments``. The one known gap is inherited from
vLLM's whole-output fallback ("a call with invalid JSON turns the entire output into content"): a stream cannot
take back calls it already sent, so a malformed call *after* one already sent (hermes: a later bad block;
llama3_json: a bad call after a ``;``) is dropped when streaming, while the whole-output parser returns the entire
text as content. Tool-call ids differ between the two (each call gets a fresh one).

Pure Python on purpose: no jax, no server imports, so the HTTP layer and its tests can use it cheaply.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, ClassVar

ToolCall = dict[str, Any]
Delta = dict[str, Any]

TOOL_CALLS_FINISH_REASON = "tool_calls"
_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_MODES = ("none", "auto", "required")
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


# --------------------------------------------------------------------------------------------------------------
# Tool call objects
# --------------------------------------------------------------------------------------------------------------


def make_tool_call_id() -> str:
    """``call_`` + 24 random hex digits: OpenAI's shape, random so ids never repeat across requests."""
    return "call_" + secrets.token_hex(12)


def make_tool_call(name: str, arguments: str, call_id: str | None = None) -> ToolCall:
    """An OpenAI ``tool_calls[i]`` object; ``arguments`` is JSON *text*, as OpenAI sends it."""
    return {
        "id": call_id or make_tool_call_id(),
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def dump_arguments(value: Any) -> str:
    """Arguments as JSON text; ``ensure_ascii=False`` keeps non-ASCII readable (vLLM does the same)."""
    return json.dumps(value, ensure_ascii=False)


# --------------------------------------------------------------------------------------------------------------
# Request side: tools, tool_choice, constraint schemas
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolChoice:
    """A request's validated ``tools`` and resolved ``tool_choice``.

    ``mode`` is ``"none"``, ``"auto"``, ``"required"`` or ``"function"`` (named; ``function_name`` says which).
    ``tools`` is the OpenAI list normalized (missing ``parameters`` filled in), fit for a chat template's ``tools``.
    """

    mode: str
    tools: tuple[dict[str, Any], ...] = ()
    function_name: str | None = None
    single_call: bool = False  # parallel_tool_calls=false: "required" makes exactly one call

    @property
    def constrained(self) -> bool:
        """Whether decoding must follow :meth:`json_schema` (named and required)."""
        return self.mode in ("function", "required")

    def parameters(self, name: str) -> dict[str, Any]:
        """The parameters schema of tool ``name``."""
        for tool in self.tools:
            if tool["function"]["name"] == name:
                return tool["function"]["parameters"]
        raise KeyError(name)

    def json_schema(self) -> dict[str, Any] | None:
        """Same as :func:`tool_choice_json_schema`."""
        return tool_choice_json_schema(self)


def _check_function(i: int, function: Any, seen: set[str]) -> dict[str, Any]:
    """Validates one ``tools[i].function`` and returns it normalized; errors name the offending field."""
    where = f"tools[{i}].function"
    if not isinstance(function, dict):
        raise ValueError(f"{where}: must be an object")
    name = function.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"{where}.name: must match {_NAME_RE.pattern}, got {name!r}")
    if name in seen:
        raise ValueError(f"{where}.name: duplicate tool name {name!r}")
    seen.add(name)
    out: dict[str, Any] = {"name": name}
    description = function.get("description")
    if description is not None:
        if not isinstance(description, str):
            raise ValueError(f"{where}.description: must be a string")
        out["description"] = description
    out["parameters"] = _check_parameters(f"{where}.parameters", function.get("parameters"))
    strict = function.get("strict")
    if strict is not None:
        if not isinstance(strict, bool):
            raise ValueError(f"{where}.strict: must be a boolean")
        out["strict"] = strict
    return out


def _check_parameters(where: str, parameters: Any) -> dict[str, Any]:
    """Parameters must be an object schema: the arguments a model writes are always a JSON object."""
    if parameters is None:
        return copy.deepcopy(_EMPTY_PARAMETERS)
    if not isinstance(parameters, dict):
        raise ValueError(f"{where}: must be a JSON schema object")
    if parameters.get("type", "object") != "object":
        raise ValueError(f"{where}.type: must be 'object', got {parameters.get('type')!r}")
    return copy.deepcopy(parameters)


def validate_tools(tools: Any) -> tuple[dict[str, Any], ...]:
    """Checks the OpenAI ``tools`` list and returns it normalized; ``None`` or ``[]`` mean no tools."""
    if tools is None:
        return ()
    if not isinstance(tools, list):
        raise ValueError("tools: must be a list")
    seen: set[str] = set()
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise ValueError(f"tools[{i}]: must be an object")
        if tool.get("type", "function") != "function":
            raise ValueError(f"tools[{i}].type: must be 'function', got {tool.get('type')!r}")
        out.append({"type": "function", "function": _check_function(i, tool.get("function"), seen)})
    return tuple(out)


def resolve_tool_choice(tools: Any, tool_choice: Any = None) -> ToolChoice:
    """Validates ``tools`` and ``tool_choice`` together; the default is ``"auto"`` with tools, else ``"none"``.

    ``"auto"`` without tools resolves to ``"none"`` (nothing could be called); ``"required"`` or a named function
    without tools is an error, as is naming a function that is not among the tools.
    """
    checked = validate_tools(tools)
    if tool_choice is None:
        tool_choice = "auto" if checked else "none"
    if isinstance(tool_choice, str):
        if tool_choice not in _MODES:
            raise ValueError(
                f"tool_choice: must be one of {', '.join(_MODES)} or a function object, got {tool_choice!r}"
            )
        if tool_choice == "required" and not checked:
            raise ValueError("tool_choice: 'required' needs tools")
        return ToolChoice("none" if not checked else tool_choice, checked)
    return ToolChoice("function", checked, _named_function(tool_choice, checked))


def _named_function(tool_choice: Any, tools: tuple[dict[str, Any], ...]) -> str:
    """The name in ``{"type": "function", "function": {"name": N}}``, which must be one of ``tools``."""
    if not isinstance(tool_choice, dict) or tool_choice.get("type", "function") != "function":
        raise ValueError("tool_choice: must be 'none', 'auto', 'required' or {'type': 'function', 'function': {...}}")
    function = tool_choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise ValueError("tool_choice.function.name: must be a string")
    if not tools:
        raise ValueError("tool_choice: a named function needs tools")
    known = [t["function"]["name"] for t in tools]
    if name not in known:
        raise ValueError(f"tool_choice.function.name: {name!r} is not among the tools ({', '.join(known)})")
    return name


def tool_choice_json_schema(choice: ToolChoice) -> dict[str, Any] | None:
    """The JSON schema decoding must follow, or None when the output is free (``none``/``auto``).

    Named: the function's parameters, since the model writes the arguments object directly. Required: a non-empty
    array of ``{"name", "parameters"}`` objects, one ``anyOf`` branch per tool (vLLM's shape), with every tool's
    ``$defs``/``definitions`` hoisted to the root so their ``#/$defs/...`` references still resolve.
    """
    if choice.mode == "function":
        assert choice.function_name is not None
        return copy.deepcopy(choice.parameters(choice.function_name))
    if choice.mode != "required":
        return None
    branches = []
    hoisted: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(choice.tools):
        params = _hoist_definitions(i, copy.deepcopy(tool["function"]["parameters"]), hoisted)
        branches.append(
            {
                "type": "object",
                "properties": {"name": {"const": tool["function"]["name"]}, "parameters": params},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": branches}}
    if choice.single_call:
        schema["maxItems"] = 1
    schema.update({key: defs for key, defs in hoisted.items() if defs})
    return schema


def _hoist_definitions(i: int, params: dict[str, Any], hoisted: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Moves ``params``' definitions into ``hoisted``; two tools defining one name differently cannot share a root."""
    for key in ("$defs", "definitions"):
        defs = params.pop(key, None)
        if defs is None:
            continue
        if not isinstance(defs, dict):
            raise ValueError(f"tools[{i}].function.parameters.{key}: must be an object")
        into = hoisted.setdefault(key, {})
        for name, definition in defs.items():
            if name in into and into[name] != definition:
                raise ValueError(f"tools[{i}].function.parameters.{key}.{name}: conflicts with another tool's")
            into[name] = definition
    return params


# --------------------------------------------------------------------------------------------------------------
# Shared parsing pieces
# --------------------------------------------------------------------------------------------------------------


def _arguments_text(value: Any) -> str | None:
    """A call's arguments as JSON text, or None when they are not an object.

    Missing arguments mean ``{}``; a JSON string holding an object (some models double-encode) is decoded first.
    """
    if value is None:
        return "{}"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return dump_arguments(value) if isinstance(value, dict) else None


def _call_from_object(obj: Any) -> ToolCall | None:
    """``{"name": N, "arguments"|"parameters": {...}}`` as a tool call, or None when it is not one."""
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    arguments = _arguments_text(obj["arguments"] if "arguments" in obj else obj.get("parameters"))
    return None if arguments is None else make_tool_call(name, arguments)


def _parse_call(text: str) -> ToolCall | None:
    """One call written as JSON text, or None when the text is not valid JSON or not a call."""
    try:
        return _call_from_object(json.loads(text))
    except ValueError:
        return None


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that begins ``tag``: text a stream must hold until it is decided."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def _skip_ws(text: str, pos: int) -> int:
    """Index of the first non-whitespace character at or after ``pos``."""
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


class _JsonEnd:
    """Finds where a JSON object or array ends, resuming where it stopped so a stream never rescans its text.

    Only brackets and strings are tracked; whether the text is valid JSON is left to ``json.loads``.
    """

    __slots__ = ("depth", "in_string", "escaped")

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def scan(self, text: str, start: int) -> int:
        """Scans ``text[start:]``; returns the index just past the closing bracket, or -1 while still open."""
        for i in range(start, len(text)):
            ch = text[i]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        return -1


class ToolStream:
    """What every stream shares: delta builders and a record of what was sent.

    ``tool_calls`` holds complete call objects (arguments so far) for the final message and the finish reason;
    ``content`` is the content sent so far.
    """

    def __init__(self) -> None:
        self.tool_calls: list[ToolCall] = []
        self._content: list[str] = []

    @property
    def content(self) -> str:
        """All content deltas so far, joined."""
        return "".join(self._content)

    def feed(self, delta: str) -> list[Delta]:
        """Takes the next piece of generated text; returns the chunk deltas it completes."""
        raise NotImplementedError

    def finish(self) -> list[Delta]:
        """Ends the output; returns the deltas for whatever was held back."""
        raise NotImplementedError

    def _say(self, out: list[Delta], text: str) -> None:
        if text:
            self._content.append(text)
            out.append({"content": text})

    def _open_call(self, out: list[Delta], name: str) -> int:
        index = len(self.tool_calls)
        call = make_tool_call(name, "")
        self.tool_calls.append(call)
        header = {"index": index, "id": call["id"], "type": "function", "function": {"name": name, "arguments": ""}}
        out.append({"tool_calls": [header]})
        return index

    def _add_arguments(self, out: list[Delta], index: int, fragment: str) -> None:
        if fragment:
            self.tool_calls[index]["function"]["arguments"] += fragment
            out.append({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})

    def _send_call(self, out: list[Delta], call: ToolCall) -> None:
        index = self._open_call(out, call["function"]["name"])
        self._add_arguments(out, index, call["function"]["arguments"])


# --------------------------------------------------------------------------------------------------------------
# tool_choice="auto" parsers
# --------------------------------------------------------------------------------------------------------------


class ToolParser(ToolStream):
    """A ``--tool-call-parser``: ``extract`` reads a whole output, ``feed``/``finish`` stream one choice.

    ``needs_special_tokens`` says the format's markers are special tokens the detokenizer must keep
    (``skip_special_tokens=False``), as vLLM's parser of the same name arranges.
    """

    name: ClassVar[str] = ""
    needs_special_tokens: ClassVar[bool] = False

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """``(content, tool_calls)`` of a whole output; content is None when empty."""
        raise NotImplementedError


class HermesToolParser(ToolParser):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (Hermes 2 Pro, Qwen 2.5/3).

    Content is the text before the first ``<tool_call>``; text between or after blocks is dropped, and a last
    block left unclosed (the stop token ended it) still counts, both as in vLLM.
    """

    name = "hermes"
    needs_special_tokens = True
    OPEN: ClassVar[str] = "<tool_call>"
    CLOSE: ClassVar[str] = "</tool_call>"

    def __init__(self) -> None:
        super().__init__()
        self._buf = ""
        self._state = self._in_content
        self._close_from = 0

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        start = text.find(self.OPEN)
        if start < 0:
            return text or None, []
        calls = []
        while start >= 0:
            body_at = start + len(self.OPEN)
            end = text.find(self.CLOSE, body_at)
            call = _parse_call(text[body_at:] if end < 0 else text[body_at:end])
            if call is None:
                return text, []  # vLLM's fallback: a malformed call makes the whole output content
            calls.append(call)
            start = -1 if end < 0 else text.find(self.OPEN, end + len(self.CLOSE))
        return text[: text.find(self.OPEN)] or None, calls

    def feed(self, delta: str) -> list[Delta]:
        self._buf += delta
        out: list[Delta] = []
        while self._state(out):
            pass
        return out

    def finish(self) -> list[Delta]:
        out = self.feed("")
        if self._state == self._in_content or self._state == self._raw:
            self._say(out, self._buf)
        elif self._state == self._in_call:
            self._end_call(out, self._buf, len(self._buf))
        self._buf = ""
        self._state = self._raw
        return out

    # Each state consumes what it can of self._buf and returns whether another state should look at the rest.

    def _in_content(self, out: list[Delta]) -> bool:
        start = self._buf.find(self.OPEN)
        if start < 0:
            keep = len(self._buf) - _partial_suffix(self._buf, self.OPEN)
            self._say(out, self._buf[:keep])
            self._buf = self._buf[keep:]
            return False
        self._say(out, self._buf[:start])
        self._enter_call(start)
        return True

    def _enter_call(self, start: int) -> None:
        self._buf = self._buf[start + len(self.OPEN) :]
        self._close_from = 0
        self._state = self._in_call

    def _in_call(self, out: list[Delta]) -> bool:
        end = self._buf.find(self.CLOSE, self._close_from)
        if end < 0:
            self._close_from = max(0, len(self._buf) - len(self.CLOSE) + 1)
            return False
        return self._end_call(out, self._buf[:end], end + len(self.CLOSE))

    def _end_call(self, out: list[Delta], body: str, consumed: int) -> bool:
        """Sends the call in ``body``; a malformed first call turns the rest of the output into content."""
        call = _parse_call(body)
        if call is None and not self.tool_calls:
            self._say(out, self.OPEN + self._buf)
            self._buf = ""
            self._state = self._raw
            return False
        if call is not None:
            self._send_call(out, call)
        self._buf = self._buf[consumed:]
        self._state = self._between
        return True

    def _between(self, out: list[Delta]) -> bool:
        start = self._buf.find(self.OPEN)
        if start < 0:
            self._buf = self._buf[len(self._buf) - _partial_suffix(self._buf, self.OPEN) :]
            return False
        self._enter_call(start)
        return True

    def _raw(self, out: list[Delta]) -> bool:
        self._say(out, self._buf)
        self._buf = ""
        return False


class Llama3JsonToolParser(ToolParser):
    """Llama 3.x JSON calls: an output that is ``{"name": ..., "parameters": {...}}`` (or ``"arguments"``).

    An optional leading ``<|python_tag|>`` is skipped, several calls may be separated by ``;``. An output that does
    not start with ``{`` (after the tag and whitespace) is plain content; one that does but is not a sequence of
    valid calls is, as in vLLM, content as a whole. Calls are never mixed with content. The stream holds back
    everything until it knows which kind the output is, and each complete call until a ``;`` or the end follows it.
    """

    name = "llama3_json"
    TAG: ClassVar[str] = "<|python_tag|>"

    def __init__(self) -> None:
        super().__init__()
        self._buf = ""
        self._pos = 0
        self._mode = "undecided"  # -> "calls" | "content" | "done"
        self._expect = "object"  # within "calls": "object" | "inside" | "separator"
        self._object_at = 0
        self._scanner = _JsonEnd()
        self._held: ToolCall | None = None

    def _calls_start(self, text: str) -> int | None:
        """Where the first call's ``{`` is, -1 when the text is content, None while it cannot be told yet."""
        pos = _skip_ws(text, 0)
        rest = text[pos:]
        if not rest or (len(rest) < len(self.TAG) and self.TAG.startswith(rest)):
            return None
        if rest.startswith(self.TAG):
            pos = _skip_ws(text, pos + len(self.TAG))
            if pos == len(text):
                return None
        return pos if text[pos] == "{" else -1

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        pos = self._calls_start(text)
        if pos is None or pos < 0:
            return text or None, []
        decoder = json.JSONDecoder()
        calls = []
        while pos < len(text):
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except ValueError:
                return text, []
            call = _call_from_object(obj)
            if call is None:
                return text, []
            calls.append(call)
            pos = _skip_ws(text, pos)
            if pos < len(text) and text[pos] == ";":
                pos = _skip_ws(text, pos + 1)
                if pos < len(text) and text[pos] != "{":
                    return text, []
            elif pos < len(text):
                return text, []
        return None, calls

    def feed(self, delta: str) -> list[Delta]:
        out: list[Delta] = []
        if self._mode == "content":
            self._say(out, delta)
            return out
        if self._mode == "done":
            return out
        self._buf += delta
        if self._mode == "undecided":
            start = self._calls_start(self._buf)
            if start is None:
                return out
            if start < 0:
                return self._to_content(out)
            self._mode, self._pos = "calls", start
        self._read_calls(out)
        return out

    def finish(self) -> list[Delta]:
        out = self.feed("")
        if self._mode == "undecided" or (self._mode == "calls" and self._expect == "inside"):
            self._fail(out)
        if self._mode == "calls":
            self._send_held(out)
        self._mode = "done"
        return out

    def _send_held(self, out: list[Delta]) -> None:
        """A complete call goes out once a ``;`` or the end of the output shows it is not followed by text."""
        if self._held is not None:
            self._send_call(out, self._held)
            self._held = None

    def _read_calls(self, out: list[Delta]) -> None:
        """Advances through ``{...} ; {...}``; a closed object's call waits in ``_held`` for what follows it."""
        text = self._buf
        while self._mode == "calls":
            if self._expect == "inside":
                end = self._scanner.scan(text, self._pos)
                if end < 0:
                    self._pos = len(text)
                    return
                self._held = _parse_call(text[self._object_at : end])
                if self._held is None:
                    self._fail(out)
                    return
                self._pos, self._expect = end, "separator"
                continue
            self._pos = _skip_ws(text, self._pos)
            if self._pos == len(text):
                return
            ch = text[self._pos]
            if self._expect == "separator" and ch == ";":
                self._send_held(out)
                self._pos, self._expect = self._pos + 1, "object"
            elif self._expect == "object" and ch == "{":
                self._object_at, self._expect, self._scanner = self._pos, "inside", _JsonEnd()
            else:
                self._fail(out)

    def _fail(self, out: list[Delta]) -> None:
        """Not a call sequence: all of it is content, unless calls went out already (then the rest is dropped)."""
        self._held = None
        if self.tool_calls:
            self._mode = "done"
        else:
            self._to_content(out)

    def _to_content(self, out: list[Delta]) -> list[Delta]:
        self._mode = "content"
        self._say(out, self._buf)
        self._buf = ""
        return out


class Llama4JsonToolParser(Llama3JsonToolParser):
    """vLLM registers the same JSON format under ``llama4_json`` as well."""

    name = "llama4_json"


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    cls.name: cls for cls in (HermesToolParser, Llama3JsonToolParser, Llama4JsonToolParser)
}


def get_tool_parser(name: str) -> type[ToolParser]:
    """The parser class ``--tool-call-parser NAME`` selects; an unknown name lists the known ones."""
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r}; known: {', '.join(sorted(TOOL_PARSERS))}") from None


# --------------------------------------------------------------------------------------------------------------
# Constrained outputs (named function, required)
# --------------------------------------------------------------------------------------------------------------


class ConstrainedToolStream(ToolStream):
    """Streams the tool calls of a constrained output.

    Named function: the output *is* the arguments, so the header (id, name) goes out on the first feed and the text
    follows as argument fragments as it arrives; surrounding whitespace is left out, so ``arguments`` is the output
    stripped (verbatim model JSON, as vLLM sends it, not re-serialized). Required: the output is a JSON array of
    ``{"name", "parameters"}``; each call goes out when its element closes. An output with no call in it at all
    (decoding was cut short, or was not constrained) becomes content at ``finish()`` so nothing is lost.
    """

    def __init__(self, choice: ToolChoice) -> None:
        super().__init__()
        if not choice.constrained:
            raise ValueError(f"tool_choice {choice.mode!r} is not constrained")
        self._choice = choice
        self._buf = ""
        self._pending_ws = ""
        self._pos = 0
        self._expect = "array"  # "array" | "item" | "inside" | "done"
        self._item_at = 0
        self._scanner = _JsonEnd()

    def feed(self, delta: str) -> list[Delta]:
        out: list[Delta] = []
        if self._choice.mode == "function":
            self._feed_arguments(out, delta)
        else:
            self._buf += delta
            self._read_items(out)
        return out

    def finish(self) -> list[Delta]:
        out = self.feed("")
        if self._choice.mode == "required" and not self.tool_calls:
            self._say(out, self._buf)
        self._buf = self._pending_ws = ""
        self._expect = "done"
        return out

    def _feed_arguments(self, out: list[Delta], delta: str) -> None:
        """Forwards argument text, holding trailing whitespace until something follows it."""
        if not self.tool_calls:
            assert self._choice.function_name is not None
            self._open_call(out, self._choice.function_name)
        if self._expect == "done":
            return
        if not self.tool_calls[0]["function"]["arguments"]:
            delta = delta.lstrip()
        text = self._pending_ws + delta
        body = text.rstrip()
        self._pending_ws = text[len(body) :]
        self._add_arguments(out, 0, body)

    def _read_items(self, out: list[Delta]) -> None:
        """Advances through ``[ {...}, {...} ]``, sending each element's call when it closes."""
        text = self._buf
        while self._expect != "done":
            if self._expect == "inside":
                end = self._scanner.scan(text, self._pos)
                if end < 0:
                    self._pos = len(text)
                    return
                call = _parse_call(text[self._item_at : end])
                if call is not None:
                    self._send_call(out, call)
                self._pos, self._expect = end, "item"
                continue
            self._pos = _skip_ws(text, self._pos)
            if self._pos == len(text):
                return
            ch = text[self._pos]
            if self._expect == "array":
                self._expect = "item" if ch == "[" else "done"
                self._pos += 1
            elif ch == "{":
                self._item_at, self._expect, self._scanner = self._pos, "inside", _JsonEnd()
            elif ch == ",":
                self._pos += 1
            else:
                self._expect = "done"  # "]" or anything the schema would not have allowed


# --------------------------------------------------------------------------------------------------------------
# Wiring helpers
# --------------------------------------------------------------------------------------------------------------


def new_tool_stream(choice: ToolChoice, parser: str | None) -> ToolStream | None:
    """The stream for one choice, or None when its text passes through untouched (``none``, or ``auto``
    without a ``--tool-call-parser``)."""
    if choice.constrained:
        return ConstrainedToolStream(choice)
    if choice.mode == "auto" and parser:
        return get_tool_parser(parser)()
    return None


def extract_tool_calls(choice: ToolChoice, parser: str | None, text: str) -> tuple[str | None, list[ToolCall]]:
    """``(content, tool_calls)`` of a whole output, matching what :func:`new_tool_stream` would stream."""
    if choice.constrained:
        return _run_stream(ConstrainedToolStream(choice), text)
    if choice.mode == "auto" and parser:
        return get_tool_parser(parser)().extract(text)
    return text, []


def _run_stream(stream: ToolStream, text: str) -> tuple[str | None, list[ToolCall]]:
    """The whole-output answer of a stream: feeding everything at once cannot differ from streaming it."""
    stream.feed(text)
    stream.finish()
    return stream.content or None, stream.tool_calls


def chat_finish_reason(choice: ToolChoice, reason: str | None, tool_calls: list[ToolCall]) -> str | None:
    """A chat choice's ``finish_reason`` once tools are involved, following vLLM and OpenAI.

    A choice that produced calls and stopped normally reports ``"tool_calls"``; a named function keeps
    ``"stop"`` (OpenAI's behaviour for a forced function); ``"length"`` and other reasons are kept so clients still
    see a cut-short output.
    """
    if reason == "stop" and tool_calls and choice.mode != "function":
        return TOOL_CALLS_FINISH_REASON
    return reason


def assistant_message(content: str | None, tool_calls: list[ToolCall]) -> dict[str, Any]:
    """A non-streaming ``choices[i].message``; ``tool_calls`` only appears when there are some."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


__all__ = [
    "TOOL_CALLS_FINISH_REASON",
    "TOOL_PARSERS",
    "ConstrainedToolStream",
    "HermesToolParser",
    "Llama3JsonToolParser",
    "Llama4JsonToolParser",
    "ToolCall",
    "ToolChoice",
    "ToolParser",
    "ToolStream",
    "assistant_message",
    "chat_finish_reason",
    "dump_arguments",
    "extract_tool_calls",
    "get_tool_parser",
    "make_tool_call",
    "make_tool_call_id",
    "new_tool_stream",
    "resolve_tool_choice",
    "tool_choice_json_schema",
    "validate_tools",
]
