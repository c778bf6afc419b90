"""OpenAI and vLLM request fields that constrain the output -> one ``StructuredOutputsParams``.

Clients ask for constrained output in four ways, all accepted on both endpoints (chat also takes tools):

- OpenAI ``response_format``: ``{"type": "text"}``, ``{"type": "json_object"}`` or
  ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``;
- vLLM's ``structured_outputs``: ``{"json" | "json_object" | "regex" | "choice" | "grammar": ...}``;
- vLLM's older ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``;
- a forced tool call (``tool_choice`` "required" or a named function), which the chat endpoint resolves.

At most one of them may be given: two constraints cannot both hold, so a second one is a 400 naming both.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from jserve.sampling_params import StructuredOutputsParams


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = "response"
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsField(BaseModel):
    """vLLM's ``structured_outputs`` request field (the Python API's StructuredOutputsParams)."""

    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class StructuredFields(BaseModel):
    """The constraint fields, mixed into both request bodies."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def structured_params(self, forced: StructuredOutputsParams | None = None) -> StructuredOutputsParams | None:
        """The request's one constraint, or None; ``forced``: the chat endpoint's tool-call constraint.
        ValueError names the conflicting or invalid field."""
        given: list[tuple[str, StructuredOutputsParams]] = []
        if forced is not None:
            given.append(("tool_choice", forced))
        if self.response_format is not None and self.response_format.type != "text":
            given.append(("response_format", _from_response_format(self.response_format)))
        if self.structured_outputs is not None:
            fields = self.structured_outputs.model_dump(by_alias=True, exclude_none=True)
            if fields.get("json_object") is False:
                del fields["json_object"]
            given.append(("structured_outputs", StructuredOutputsParams(**fields)))
        guided = {
            "json": self.guided_json,
            "regex": self.guided_regex,
            "choice": self.guided_choice,
            "grammar": self.guided_grammar,
        }
        for kind, value in guided.items():
            if value is not None:
                given.append((f"guided_{kind}", StructuredOutputsParams(**{kind: value})))
        if len(given) > 1:
            names = ", ".join(name for name, _ in given)
            raise ValueError(f"{names}: each constrains the output; a request may set only one of them")
        return given[0][1] if given else None


def _from_response_format(fmt: ResponseFormat) -> StructuredOutputsParams:
    if fmt.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    if fmt.json_schema is None or fmt.json_schema.json_schema is None:
        raise ValueError("response_format.json_schema.schema: required when type is 'json_schema'")
    return StructuredOutputsParams(json=fmt.json_schema.json_schema)
