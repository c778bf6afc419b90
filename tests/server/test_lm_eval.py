"""lm-evaluation-harness against the OpenAI server: a tiny multiple-choice task scored through /v1/completions.

lm-eval's ``local-completions`` model scores each (context, choice) pair with one request: the token ids of
context + continuation, ``echo=true``, ``logprobs=1``, ``max_tokens=1``; it sums ``token_logprobs[ctxlen:-1]``
(the continuation's prompt logprobs; the last entry is the generated token) and calls the choice greedy when each
of those tokens is its position's best. The test checks both numbers for every choice against an independent
path: ``jserve.LLM`` on the same checkpoint with ``prompt_logprobs``, tokenized the way lm-eval does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jserve.bundled import BUNDLED_MODEL
from tests.server.harness import ServerProcess

MODEL = "tiny-pycoder"
TASK = "jserve_tiny_mc"
DOCS = [
    {"context": "def add(a, b):\n    return", "choices": [" a + b", " a - b", " None"], "label": 0},
    {"context": "import os\nimport", "choices": [" sys", " banana"], "label": 0},
    {"context": "for i in range(10):\n   ", "choices": [" print(i)", " return"], "label": 0},
    {
        "context": "    def __init__(self, x, y):\n        self.x = x\n        self.y =",
        "choices": [" y", " x"],
        "label": 0,
    },
]


def _write_task(directory: Path) -> None:
    data = directory / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (directory / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {json.dumps(str(data))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: context\n"
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        'target_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n"
    )


def _run_lm_eval(port: int, tmp_path: Path) -> list[dict]:
    """lm-eval's CLI, as a user runs it; returns its logged samples."""
    _write_task(tmp_path)
    out = tmp_path / "out"
    model_args = ",".join(
        [
            f"base_url=http://127.0.0.1:{port}/v1/completions",
            f"model={MODEL}",
            "tokenizer_backend=huggingface",
            f"tokenizer={BUNDLED_MODEL}",
            "num_concurrent=1",
            "max_retries=1",
        ]
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args]
    command += ["--tasks", TASK, "--include_path", str(tmp_path), "--log_samples", "--output_path", str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    (samples_file,) = out.rglob(f"samples_{TASK}_*.jsonl")
    return [json.loads(line) for line in samples_file.read_text().splitlines()]


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's rule: trailing spaces move to the continuation; the continuation is the whole's tail."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    return context_ids, whole[len(context_ids) :]


def _expected(pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
    """(sum of the continuation's prompt logprobs, every continuation token is its position's best) per pair."""
    from transformers import AutoTokenizer

    from jserve import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(str(BUNDLED_MODEL))
    encoded = [_encode_pair(tokenizer, context, continuation) for context, continuation in pairs]
    llm = LLM(precompile=False)
    outs = llm.generate(
        prompt_token_ids=[ctx + cont for ctx, cont in encoded],
        sampling_params=SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0),
        use_tqdm=False,
    )
    expected = []
    for (ctx, cont), out in zip(encoded, outs, strict=True):
        ids = ctx + cont
        entries = [out.prompt_logprobs[i] for i in range(len(ctx), len(ids))]
        total = sum(entry[t] for entry, t in zip(entries, cont, strict=True))
        greedy = all(entry[t] == max(entry.values()) for entry, t in zip(entries, cont, strict=True))
        expected.append((total, greedy))
    return expected


def test_lm_eval_multiple_choice_loglikelihoods_match_llm_prompt_logprobs(tmp_path):
    server = ServerProcess("--http-port", "0").start()
    try:
        samples = _run_lm_eval(server.http_port, tmp_path)
    finally:
        assert server.stop() == 0
    assert len(samples) == len(DOCS)
    pairs, got = [], []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        doc = DOCS[s["doc_id"]]
        assert [a["arg_1"] for a in s["arguments"].values()] == doc["choices"]
        pairs += [(a["arg_0"], a["arg_1"]) for a in s["arguments"].values()]
        got += [(float(ll), greedy == "True") for ll, greedy in s["filtered_resps"]]  # logged as strings
    expected = _expected(pairs)
    assert len(got) == len(expected) == sum(len(d["choices"]) for d in DOCS)
    for pair, (ll, greedy), (want_ll, want_greedy) in zip(pairs, got, expected, strict=True):
        assert ll == pytest.approx(want_ll, abs=1e-3), pair
        assert greedy == want_greedy, pair
    assert len({round(ll, 3) for ll, _ in got}) > 1  # real scores, not one constant
    assert {greedy for _, greedy in got} == {True, False}  # both outcomes of lm-eval's greedy check occur
