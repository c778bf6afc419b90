"""``StructuredOutputsParams`` -> llguidance grammar text (one function per kind)."""

from __future__ import annotations

import json

import llguidance

from jserve.sampling_params import StructuredOutputsParams

# Compact JSON (no free whitespace): a model may otherwise spend its whole budget on spaces and newlines, which
# the JSON grammar allows between any two tokens. vLLM's disable_any_whitespace, on by default here.
_JSON_OPTIONS = {"whitespace_flexible": False}


def grammar_text(spec: StructuredOutputsParams) -> str:
    """The llguidance grammar of ``spec``; raises ValueError naming the field when it cannot be built."""
    kind = spec.kind
    try:
        if kind == "json":
            return llguidance.LLMatcher.grammar_from_json_schema(spec.json, defaults=_JSON_OPTIONS)
        if kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec.regex)
        if kind == "choice":
            # one Lark string literal per choice: JSON string escapes are Lark's
            alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice)
            return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}")
        return llguidance.LLMatcher.grammar_from_lark(spec.grammar)
    except ValueError as e:
        raise ValueError(f"structured_outputs.{kind}: {e}") from None
