"""Structured outputs end to end on the bundled trained model: every kind's outputs are in its language, and
constraints compose with n, seeds, logprobs, stop strings, max_tokens, preemption and speculative decoding.

The engines are the speculative-decoding tests' (built once per process: shared when both modules run on the same
xdist worker): a plain one, n-gram and early exit, all with a pool small enough that a few dozen requests
preempt.
"""

from __future__ import annotations

import ast
import json
import re

import jsonschema
import pytest

from jserve import SamplingParams, StructuredOutputsParams
from jserve.structured import GrammarCompiler
from tests.engine.workloads import assert_no_leak
from tests.speculative.test_speculative import _speculative_engine, plain_engine
from tests.structured.schemas import HEAVY_SCHEMA

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 6}, "id": {"type": "integer", "minimum": 0}},
                "required": ["name", "id"],
                "additionalProperties": False,
            },
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"],
        "additionalProperties": False,
    },
    "enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": [1, 2, 3]}},
        "required": ["color", "size"],
        "additionalProperties": False,
    },
    "array": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 1, "maxItems": 3}
        },
        "required": ["tags"],
        "additionalProperties": False,
    },
    "ranges": {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
            # an unbounded fraction lets a model write digits until max_tokens; multipleOf bounds it
            "score": {"type": "number", "minimum": -1.5, "maximum": 2.5, "multipleOf": 0.25},
        },
        "required": ["age", "score"],
        "additionalProperties": False,
    },
}
PROMPTS = ["def parse(config):\n    return ", "import json\n\ndata = ", "# settings\nx = "]
ARITHMETIC = """
start: expr
expr: term (("+" | "-") term){0,2}
term: NUMBER | NAME "(" NUMBER ")"
NUMBER: /[0-9]{1,3}/
NAME: /[a-z]{1,6}/
"""


@pytest.fixture(scope="module")
def llm():
    return plain_engine()


def _params(spec: StructuredOutputsParams, i: int, **kwargs) -> SamplingParams:
    """Greedy for even i, seeded temperature-1 sampling for odd i."""
    options = dict(max_tokens=64, temperature=0.0 if i % 2 == 0 else 1.0, seed=i, structured_outputs=spec)
    return SamplingParams(**{**options, **kwargs})


def test_json_schemas_validate_and_stop(llm):
    cases = [(name, i) for name in SCHEMAS for i in range(4)]
    outputs = llm.generate(
        [PROMPTS[i % len(PROMPTS)] for _, i in cases],
        [_params(StructuredOutputsParams(json=SCHEMAS[name]), i) for name, i in cases],
        use_tqdm=False,
    )
    for (name, _), out in zip(cases, outputs, strict=True):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", (name, completion.text)
        jsonschema.validate(json.loads(completion.text), SCHEMAS[name])
    assert_no_leak(llm)


def test_regex_choice_and_lark_grammar(llm):
    regex = r"[a-z]{2,8}@[a-z]{2,6}\.(com|org|net)"
    choices = ["fn", "class", "import os", "lambda: 0"]
    specs = [
        StructuredOutputsParams(regex=regex),
        StructuredOutputsParams(choice=choices),
        StructuredOutputsParams(grammar=ARITHMETIC),
    ]
    cases = [(k, i) for k in range(3) for i in range(4)]
    outputs = llm.generate(
        [PROMPTS[i % len(PROMPTS)] for _, i in cases], [_params(specs[k], i) for k, i in cases], use_tqdm=False
    )
    for (k, _), out in zip(cases, outputs, strict=True):
        text = out.outputs[0].text
        assert out.outputs[0].finish_reason == "stop", text
        if k == 0:
            assert re.fullmatch(regex, text), text
        elif k == 1:
            assert text in choices
        else:
            tree = ast.parse(text, mode="eval")  # the grammar's language is a subset of Python expressions
            assert re.fullmatch(r"([a-z]{1,6}\(\d{1,3}\)|\d{1,3})([+-]([a-z]{1,6}\(\d{1,3}\)|\d{1,3})){0,2}", text)
            assert isinstance(tree, ast.Expression)


def test_composes_with_n_logprobs_stop_and_max_tokens(llm):
    regex = StructuredOutputsParams(regex=r"(alpha|beta|gamma)( (alpha|beta|gamma)){3,6}")
    n_out, stopped, short = llm.generate(
        ["x = ", "y = ", "z = "],
        [
            _params(regex, 1, n=3, logprobs=2),
            _params(regex, 0, stop=["beta"]),
            _params(StructuredOutputsParams(json=SCHEMAS["nested"]), 0, max_tokens=3),
        ],
        use_tqdm=False,
    )
    assert len(n_out.outputs) == 3
    for c in n_out.outputs:
        assert re.fullmatch(r"(alpha|beta|gamma)( (alpha|beta|gamma)){3,6}", c.text), c.text
        assert len(c.logprobs) == len(c.token_ids) and all(t in e for t, e in zip(c.token_ids, c.logprobs, strict=True))
    # a stop string cuts the constrained text (the stop string itself is not part of it)
    c = stopped.outputs[0]
    if c.stop_reason == "beta":
        assert "beta" not in c.text and re.fullmatch(r"((alpha|gamma) ?)*", c.text), c.text
    else:
        assert re.fullmatch(r"(alpha|gamma)( (alpha|gamma)){3,6}", c.text), c.text
    # max_tokens ends a constrained request early: "length", and a prefix of a valid document
    c = short.outputs[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 3
    assert '{"user":'.startswith(c.text) or c.text.startswith('{"user":'), c.text
    assert_no_leak(llm)


def test_constrained_requests_keep_the_lookahead(llm, monkeypatch):
    """Under async scheduling a constrained row's next step runs its forward before the row's last token
    reaches the host, and samples in a second program once the grammar has seen that token: outputs equal
    those of synchronous stepping (greedy and seeded), and the steps did defer their sampling."""
    engine = llm.engine
    cases = [(name, i) for name in ("nested", "array") for i in range(3)]
    prompts = [PROMPTS[i % len(PROMPTS)] for _, i in cases]
    params = [_params(StructuredOutputsParams(json=SCHEMAS[name]), i) for name, i in cases]
    params.append(SamplingParams(max_tokens=24, temperature=0.0))  # an unconstrained row in the same steps
    prompts.append(PROMPTS[0])
    deferred = []
    sample_deferred = engine.runner.sample_deferred
    monkeypatch.setattr(engine.runner, "sample_deferred", lambda *a: deferred.append(1) or sample_deferred(*a))
    assert engine._defer_grammar
    lookahead = llm.generate(prompts, params, use_tqdm=False)
    assert len(deferred) >= 10
    monkeypatch.setattr(engine, "_defer_grammar", False)  # the synchronous stepping of engines without it
    synchronous = llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(lookahead, synchronous, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    for (name, _), out in zip(cases, lookahead[:-1], strict=True):
        jsonschema.validate(json.loads(out.outputs[0].text), SCHEMAS[name])
    assert_no_leak(llm)


def test_grammar_state_survives_preemption(llm):
    """32 constrained requests overflow the pool (preemption recomputes them); greedy outputs equal each
    request run alone, and every one is in the language."""
    spec = StructuredOutputsParams(json=SCHEMAS["array"])
    prompts = [f"# record {i}\n" + "value = compute(x)\n" * (i % 5 + 20) + "tags = " for i in range(32)]
    params = SamplingParams(max_tokens=40, temperature=0.0, structured_outputs=spec)
    before = llm.stats()["num_preemptions"]
    together = llm.generate(prompts, params, use_tqdm=False)
    assert llm.stats()["num_preemptions"] > before
    alone = [llm.generate(p, params, use_tqdm=False)[0] for p in prompts[::8]]
    for a, b in zip(alone, together[::8], strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    for out in together:
        jsonschema.validate(json.loads(out.outputs[0].text), SCHEMAS["array"])
    assert_no_leak(llm)


def _copy_prompt() -> str:
    """An input-grounded prompt: the answer repeats a record from the prompt, which n-gram drafts find."""
    record = '{"user":{"name":"alice","id":42},"active":true}'
    return f"records = [\n    {record},\n    {record},\n    {record},\n]\nfirst = "


@pytest.mark.parametrize("method", ["ngram", "early_exit", "draft"])
def test_speculation_keeps_greedy_constrained_outputs(llm, method):
    """Drafts are checked against the grammar (n-gram: before verification; device drafters: each verified
    position gets the mask after the drafts before it) and what verification rejects is never consumed: greedy
    constrained outputs equal plain decoding's, and drafts are accepted inside constrained text."""
    _, spec_llm, _ = _speculative_engine(method)
    cases = [
        (_copy_prompt(), StructuredOutputsParams(json=SCHEMAS["nested"])),
        (PROMPTS[0], StructuredOutputsParams(regex=r"[a-z_]{1,12}\([a-z]{0,6}\)")),
        (PROMPTS[1], StructuredOutputsParams(grammar=ARITHMETIC)),
    ]
    params = [SamplingParams(max_tokens=48, temperature=0.0, structured_outputs=s) for _, s in cases]
    prompts = [p for p, _ in cases]
    want = llm.generate(prompts, params, use_tqdm=False)
    got = spec_llm.generate(prompts, params, use_tqdm=False)
    for w, g in zip(want, got, strict=True):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
    assert all(o.metrics.num_draft_tokens > 0 for o in got)  # constrained requests speculate, every method
    assert got[0].metrics.num_accepted_tokens > 0  # the copied record is drafted and accepted
    sampled = spec_llm.generate(
        [_copy_prompt()] * 4,
        [_params(StructuredOutputsParams(json=SCHEMAS["nested"]), 2 * i + 1) for i in range(4)],
        use_tqdm=False,
    )
    for out in sampled:
        jsonschema.validate(json.loads(out.outputs[0].text), SCHEMAS["nested"])
    assert_no_leak(spec_llm)


@pytest.mark.parametrize(
    "spec, message",
    [
        (dict(json={"type": "object", "properties": {"a": {"type": "strnig"}}}), "structured_outputs.json"),
        (dict(regex="(unclosed"), "structured_outputs.regex"),
        (dict(grammar="start: missing_rule"), "structured_outputs.grammar"),
    ],
)
def test_invalid_grammar_is_a_value_error_and_the_engine_keeps_serving(llm, spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        llm.generate("x = ", SamplingParams(structured_outputs=StructuredOutputsParams(**spec)), use_tqdm=False)
    out = llm.generate("x = ", SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4
    assert_no_leak(llm)


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(regex="a", choice=["a"]), dict(choice=[]), dict(choice="ab"), dict(json="{not json"), dict(regex="")],
)
def test_params_are_validated_at_the_door(kwargs):
    with pytest.raises(ValueError, match="structured_outputs"):
        StructuredOutputsParams(**kwargs)
    with pytest.raises(ValueError, match="structured_outputs: unknown field"):
        SamplingParams(structured_outputs={"jsonschema": {}})


def test_compile_timeout_fails_only_the_wait_and_the_result_is_cached(llm):
    compiler = GrammarCompiler(llm.tokenizer, llm.engine.vocab_size, llm.tokenizer.eos_token_ids, timeout=0.05)
    spec = StructuredOutputsParams(json=HEAVY_SCHEMA)
    with pytest.raises(ValueError, match=r"structured_outputs\.json: the grammar did not compile within 0.05 s"):
        compiler.compile(spec)
    compiler.submit(spec).result(timeout=60)  # it went on compiling; the next request finds it cached
    assert compiler.compile(spec).key == spec.key()
    compiler.shutdown()
