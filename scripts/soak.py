"""Composition soak: one server with every serving feature on at once, random traffic, checked against a reference.

The server (started here, or an already running one given with ``--url`` and ``--grpc``) runs n-gram
speculation, structured outputs, an int8 KV cache, prefix caching, a page pool small enough to preempt, and
async scheduling (the default), all at once. For ``--duration`` seconds, ``--concurrency`` workers send a random
mix over HTTP (OpenAI ``/v1/completions``, streaming or not) and gRPC (``jserve.v1.Generation/Generate``):

- good greedy requests (temperature 0; some with n > 1, logprobs, stop strings, a shared long prefix,
  presence / frequency penalties, a regex / JSON-schema / choice constraint), each checked against an
  in-process reference engine (``jserve.LLM`` on the same model and KV dtype, no speculation, no prefix
  caching, a pool that never preempts) that ran each distinct request once: every sample's text equals the
  reference's (and its token ids, over gRPC, for requests without stop strings), and its logprobs are within
  0.05 nats. Requests are cut short of any greedy choice the reference made by less than 0.1 nats (see
  ``compute_references``), so only a real difference, never float noise, can fail the comparison;
- cancels: the client closes a stream after a few chunks; what came must be a prefix of the reference;
- disconnects: the connection drops (a raw HTTP socket closed or reset, a gRPC channel closed mid-call);
- deadlines: gRPC deadlines and HTTP client timeouts of 50 ms to 1.5 s (what came before must be a prefix);
- bad requests: out-of-range or mistyped fields, unknown fields, ids outside the vocabulary, too-long prompts,
  grammars that do not compile, requests that can never fit the pool, bodies that are not JSON; each must get
  HTTP 400 (404 for an unknown model) / gRPC INVALID_ARGUMENT (RESOURCE_EXHAUSTED for never-fits), never a 5xx.

Afterwards, with the load stopped: no engine step failed (``jserve:engine_step_failures_total``), no request
ended in an engine error, no KV page is held and nothing runs or waits (``jserve:kv_cache_pages_used``,
``num_requests_running`` / ``waiting``), the server's RSS at the end is within ``--max-rss-growth-mb`` of the
lowest it read after the warm-up, health was SERVING (HTTP ``/health`` 200 and gRPC ``grpc.health.v1``) at
every probe and still is, nothing compiled while serving, and the composition was exercised (preemptions, speculative
drafts, prefix-cache hits, structured outputs). Prints a summary and exits 1 if any check failed.

    python scripts/soak.py --duration 1800
    python scripts/soak.py --url http://127.0.0.1:8000 --grpc 127.0.0.1:9000 --duration 600

Only loopback addresses are accepted. Every loop is bounded (``--duration``, ``--max-requests``, a timeout per
request), and a server this script started is stopped with SIGTERM at the end (its drain must exit 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import grpc
import httpx
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from jserve.bundled import BUNDLED_MODEL  # noqa: E402
from jserve.server.gen import jserve_pb2 as pb  # noqa: E402
from jserve.server.gen import jserve_pb2_grpc as pb_grpc  # noqa: E402

# ---------------------------------------------------------------------------------------------- settings

SERVER_FLAGS: tuple[str, ...] = (
    "--max-model-len", "256",
    "--max-num-seqs", "8",
    "--max-num-batched-tokens", "64",  # 4 token buckets: few programs to compile
    "--page-size", "16",
    "--num-pages", "32",  # 31 usable pages: 8 sequences of up to 16 pages each preempt one another
    "--kv-cache-dtype", "int8",
    "--enable-prefix-caching",
    "--speculative-model", "ngram",
    "--num-speculative-tokens", "3",
    "--speculative-max-batch-size", "8",  # speculate at every batch size the server runs
    "--structured-output-timeout", "20",
    "--async-scheduling",
)  # fmt: skip
"""The composition under test (``python -m jserve.launch`` flags; the ports are added separately)."""

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
GOOD_TIMEOUT = 180.0  # seconds a good request may take before it counts as a failure
BAD_TIMEOUT = 30.0  # a refusal comes at once; this only bounds the wait
PROBE_TIMEOUT = 10.0  # health and metrics probes
NEAR_TIE = 0.1  # nats: requests are cut short of a greedy choice whose top two logprobs are this close
MIN_CUT_TOKENS = 4  # a request cut to fewer tokens than this is dropped instead
REFERENCE_LOGPROBS = 20  # top logprobs the reference reports per token (the engines' default max_logprobs)
LOGPROB_TOLERANCE = 0.05  # nats between the server's and the reference's logprob of the same token
MAX_FAILURE_MESSAGES = 50

# ---------------------------------------------------------------------------------------------- the workload

SHARED_PREFIX = '''import os
import sys
from collections import OrderedDict


class Registry:
    """A mapping of names to handlers, kept in insertion order."""

    def __init__(self, name, parent=None):
        self.name = name
        self.parent = parent
        self._handlers = OrderedDict()

    def register(self, key, handler):
        if key in self._handlers:
            raise KeyError("duplicate handler: %r" % (key,))
        self._handlers[key] = handler
        return handler

'''
"""~120 tokens (7 full KV pages) that several prompts start with: their requests hit the prefix cache."""

PREFIX_SUFFIXES = (
    "    def lookup(self, key):\n",
    "    def unregister(self, key):\n",
    "    def __len__(self):\n",
    "    def __iter__(self):\n",
    "    def names(self):\n",
    "    def __repr__(self):\n",
)

PROMPTS = (
    "def fibonacci(n):\n",
    "import os\n\n\ndef read_file(path):\n",
    "class Stack:\n    def __init__(self):\n",
    "def parse_args(argv=None):\n    parser = argparse.ArgumentParser(",
    "for i in range(10):\n",
    "    def __eq__(self, other):\n",
    'def main():\n    """Run the program."""\n',
    "try:\n    import json\nexcept ImportError:\n",
    "def _check_type(value, expected):\n    if not isinstance(value, expected):\n",
    "with open(filename) as f:\n",
    "class HTTPError(Exception):\n",
    "def add(a, b):\n    return a + b\n\n\ndef add_v2(a, b):\n",  # repeats itself: n-gram drafts get accepted
)

STOP_STRINGS = (("\n",), ("):",), ("return", "\n\n"), (" = ",))

JSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "kind": {"enum": ["function", "class"]},
        "lines": {"type": "integer", "minimum": 1, "maximum": 500},
    },
    "required": ["name", "kind", "lines"],
    "additionalProperties": False,
}
STRUCTURED: tuple[tuple[str, str], ...] = (
    ("regex", r"[a-z_]{2,12}\([a-z_, ]{0,16}\)"),
    ("regex", r"(True|False|None|[0-9]{1,3})"),
    ("choice", json.dumps(["self", "cls", "None"])),
    ("choice", json.dumps(["return", "raise", "yield", "pass"])),
    ("json", json.dumps(JSON_SCHEMA, sort_keys=True)),
)
"""(kind, value as text): the regex, the JSON list of choices, or the JSON schema's text."""


@dataclass(frozen=True)
class RequestSpec:
    """Everything that decides a greedy request's output: the key of the reference cache. How a request is
    sent (transport, streaming, n, logprobs, text or ids) must not change its output, so it is not part of it."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    stop: tuple[str, ...] = ()
    structured: tuple[str, str] | None = None
    presence_penalty: float = 0.0  # additive penalties (not repetition_penalty): the reference can tell how
    frequency_penalty: float = 0.0  # decisive each greedy choice was from the raw logprobs it reports
    ignore_eos: bool = False
    prompt_text: str | None = field(default=None, compare=False)  # set when it tokenizes to exactly prompt_ids
    shared_prefix: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class Reference:
    """The reference engine's greedy output for one RequestSpec."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: str
    logprobs: tuple[float, ...]  # of each chosen token
    gaps: tuple[float, ...]  # how decisive each greedy choice was, in nats (see decision_gaps)


def build_catalogue(tokenizer) -> list[RequestSpec]:
    """The distinct good requests (deterministic): every prompt plain at two lengths, and a spread of stop
    strings, penalties, long ignore-EOS runs and constraints over the prompts and the shared-prefix ones."""

    def spec(text: str, **kwargs: Any) -> RequestSpec:
        ids = tuple(tokenizer.encode(text, add_special_tokens=True))
        return RequestSpec(prompt_ids=ids, prompt_text=text, **kwargs)

    specs: list[RequestSpec] = []
    for i, text in enumerate(PROMPTS):
        specs.append(spec(text, max_tokens=24))
        specs.append(spec(text, max_tokens=64))
        specs.append(spec(text, max_tokens=48, stop=STOP_STRINGS[i % len(STOP_STRINGS)]))
        specs.append(spec(text, max_tokens=48, structured=STRUCTURED[i % len(STRUCTURED)]))
        if i % 3 == 0:
            specs.append(spec(text, max_tokens=40, presence_penalty=0.5, frequency_penalty=0.3))
        if i % 4 == 1:
            specs.append(spec(text, max_tokens=120, ignore_eos=True))
    for i, suffix in enumerate(PREFIX_SUFFIXES):
        text = SHARED_PREFIX + suffix
        specs.append(spec(text, max_tokens=48, shared_prefix=True))
        specs.append(spec(text, max_tokens=32, stop=STOP_STRINGS[i % len(STOP_STRINGS)], shared_prefix=True))
        if i % 2 == 0:
            specs.append(spec(text, max_tokens=40, structured=STRUCTURED[i % len(STRUCTURED)], shared_prefix=True))
    return list(dict.fromkeys(specs))  # distinct, in order


# ---------------------------------------------------------------------------------------------- the reference


def reference_sampling_params(spec: RequestSpec, logprobs: int = REFERENCE_LOGPROBS):
    """The offline SamplingParams equal to what the server builds for ``spec``, plus top logprobs."""
    from jserve import SamplingParams

    return SamplingParams(
        temperature=0.0,
        max_tokens=spec.max_tokens,
        stop=list(spec.stop) or None,
        presence_penalty=spec.presence_penalty,
        frequency_penalty=spec.frequency_penalty,
        ignore_eos=spec.ignore_eos,
        structured_outputs=structured_params(spec),
        logprobs=logprobs,
    )


def structured_params(spec: RequestSpec):
    from jserve import StructuredOutputsParams

    if spec.structured is None:
        return None
    kind, value = spec.structured
    return StructuredOutputsParams(**{kind: json.loads(value) if kind in ("json", "choice") else value})


def compute_references(
    specs: Sequence[RequestSpec],
    *,
    model: str,
    max_model_len: int,
    kv_cache_dtype: str,
    page_size: int = 16,
    margin: float = NEAR_TIE,
    log: Callable[[str], None] = print,
) -> tuple[list[RequestSpec], dict[RequestSpec, Reference]]:
    """Runs every distinct request once on a plain in-process engine (same model and KV dtype, no speculation,
    no prefix caching, a pool that holds every sequence at full length: nothing is ever preempted).

    Returns the requests to send and their references. A request with a near-tie greedy choice (decided by less
    than ``margin`` nats, see ``decision_gaps``) is cut to end before it, or dropped if that leaves fewer than
    MIN_CUT_TOKENS tokens: the server computes the same math in other batch shapes (chunks, prefix-cache hits,
    speculative verification), float reassociation moves its values by ~1e-6, and where that flips the int8
    rounding of a K/V element the logprobs move by up to ~0.02 nats (measured), which can legitimately flip a
    near-tie. Everything sent is decided by at least ``margin``."""
    from jserve import LLM

    max_num_seqs = 16
    vocab_size = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    llm = LLM(
        model,
        kv_cache_dtype=kv_cache_dtype,
        max_model_len=max_model_len,
        page_size=page_size,
        num_pages=max_num_seqs * math.ceil(max_model_len / page_size) + 1,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=64,  # 4 programs to compile (on first use)
        enable_prefix_caching=False,
        max_logprobs=vocab_size,  # constrained requests ask for every token's logprob
        precompile=False,
        progress=False,
    )
    references = _run_references(llm, specs)
    decisive, cut, dropped = [], [], 0
    for spec in specs:
        ties = [i for i, gap in enumerate(references[spec].gaps) if gap < margin]
        if not ties:
            decisive.append(spec)
        elif ties[0] >= MIN_CUT_TOKENS:
            cut.append(replace(spec, max_tokens=ties[0]))
        else:
            dropped += 1
    references.update(_run_references(llm, [spec for spec in dict.fromkeys(cut) if spec not in references]))
    kept = list(dict.fromkeys(decisive + [spec for spec in cut if min(references[spec].gaps, default=1) >= margin]))
    by_kind = Counter(spec.structured[0] if spec.structured else "plain" for spec in kept)
    log(
        f"soak: {len(specs)} distinct requests: {len(decisive)} decisive, {len(cut)} cut short of a near-tie (a "
        f"greedy choice decided by < {margin:g} nats), {dropped} dropped; {len(kept)} to send ({dict(by_kind)})"
    )
    return kept, {spec: references[spec] for spec in kept}


def _run_references(llm, specs: Sequence[RequestSpec]) -> dict[RequestSpec, Reference]:
    """The reference of each spec: constrained ones ask for the whole vocabulary's logprobs (their choices are
    judged among the tokens the grammar allowed), the others for the top REFERENCE_LOGPROBS."""
    if not specs:
        return {}
    vocab = llm.engine.vocab_size
    outputs = llm.generate(
        prompt_token_ids=[list(s.prompt_ids) for s in specs],
        sampling_params=[reference_sampling_params(s, vocab if s.structured else REFERENCE_LOGPROBS) for s in specs],
        use_tqdm=False,
    )
    references = {}
    for spec, out in zip(specs, outputs, strict=True):
        c = out.outputs[0]
        entries = c.logprobs or []
        allowed = grammar_masks(llm, spec, c.token_ids) if spec.structured else None
        chosen = tuple(entry[token] for token, entry in zip(c.token_ids, entries, strict=True))
        gaps = decision_gaps(spec, c.token_ids, entries, allowed)
        references[spec] = Reference(tuple(c.token_ids), c.text, c.finish_reason or "", chosen, gaps)
    return references


def grammar_masks(llm, spec: RequestSpec, token_ids: Sequence[int]) -> list[set[int]]:
    """The tokens the request's grammar allowed at each position of ``token_ids`` (the engine's own matcher)."""
    import numpy as np

    from jserve.structured.matcher import bitmask_words

    vocab = llm.engine.vocab_size
    state = llm.engine.compile_grammar(reference_sampling_params(spec)).new_state()
    row = np.zeros((1, bitmask_words(vocab)), np.int32)
    allowed = []
    for token in token_ids:
        state.fill(row, 0)
        bits = np.unpackbits(row[0].view(np.uint8), bitorder="little")[:vocab]
        allowed.append(set(np.flatnonzero(bits).tolist()))
        state.accept([token])
    return allowed


def decision_gaps(
    spec: RequestSpec,
    token_ids: Sequence[int],
    entries: Sequence[dict[int, float]],
    allowed: Sequence[set[int]] | None = None,
) -> tuple[float, ...]:
    """How decisive each greedy choice was: the chosen token's score minus the best competitor's, in nats.

    Reported logprobs are of the raw logits; greedy takes the argmax after the grammar's mask and the
    penalties. The additive penalties are applied here as the sampler does (to output tokens so far). With a
    grammar (``allowed``, and every token's logprob reported) the competitors are the other allowed tokens.
    Without one they are all other tokens, and one outside the reported top REFERENCE_LOGPROBS scores at most
    the lowest reported (penalties only lower scores)."""
    counts: Counter = Counter()
    gaps = []
    for i, (token, entry) in enumerate(zip(token_ids, entries, strict=True)):
        score = {t: lp - spec.frequency_penalty * counts[t] - spec.presence_penalty * (counts[t] > 0)
                 for t, lp in entry.items()}  # fmt: skip
        if allowed is not None:
            rivals = [score.get(t, -math.inf) for t in allowed[i] if t != token]
        else:
            rivals = [v for t, v in score.items() if t != token]
            if len(entry) >= REFERENCE_LOGPROBS:
                rivals.append(sorted(entry.values(), reverse=True)[REFERENCE_LOGPROBS - 1])
        gaps.append(score[token] - max(rivals, default=-math.inf))
        counts[token] += 1
    return tuple(gaps)


# ---------------------------------------------------------------------------------------------- what came back


@dataclass
class Sample:
    """One sample as received: over HTTP text (and logprobs), over gRPC also its token ids."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class Outcome:
    """How one call ended: ``ok`` (complete), ``cancelled`` (we closed it), ``deadline``, or ``error``."""

    status: str = "ok"
    error: str = ""
    samples: dict[int, Sample] = field(default_factory=dict)
    chunks: int = 0  # responses / events that carried tokens

    def sample(self, index: int) -> Sample:
        return self.samples.setdefault(index, Sample())


@dataclass(frozen=True)
class Delivery:
    """How a good request is sent; none of it may change the greedy output."""

    transport: str  # "http" | "grpc"
    stream: bool
    n: int
    logprobs: int | None
    as_text: bool
    speculative: bool | None = None  # gRPC only: False opts the request out of speculation


def random_delivery(rng: random.Random, spec: RequestSpec, *, stream: bool | None = None) -> Delivery:
    transport = rng.choice(("http", "grpc"))
    return Delivery(
        transport=transport,
        stream=rng.random() < 0.5 if stream is None else stream,
        n=rng.choice((1, 1, 1, 2, 3)),
        logprobs=rng.choice((None, None, 1, 5)),
        as_text=spec.prompt_text is not None and rng.random() < 0.5,
        speculative=False if transport == "grpc" and rng.random() < 0.1 else None,
    )


def http_body(model_name: str, spec: RequestSpec, d: Delivery, rng: random.Random) -> dict[str, Any]:
    """The /v1/completions body for ``spec`` sent as ``d``; constraints use either spelling the API takes."""
    body: dict[str, Any] = {
        "model": model_name,
        "prompt": spec.prompt_text if d.as_text else list(spec.prompt_ids),
        "max_tokens": spec.max_tokens,
        "temperature": 0,
        "n": d.n,
        "stream": d.stream,
    }
    if spec.stop:
        body["stop"] = list(spec.stop)
    if d.logprobs is not None:
        body["logprobs"] = d.logprobs
    if spec.presence_penalty or spec.frequency_penalty:
        body.update(presence_penalty=spec.presence_penalty, frequency_penalty=spec.frequency_penalty)
    if spec.ignore_eos:
        body["ignore_eos"] = True
    if spec.structured is not None:
        kind, value = spec.structured
        parsed = json.loads(value) if kind in ("json", "choice") else value
        if rng.random() < 0.5:
            body["structured_outputs"] = {kind: parsed}
        else:
            body[f"guided_{kind}"] = parsed
    return body


def grpc_request(spec: RequestSpec, d: Delivery) -> pb.GenerateRequest:
    """The jserve.v1 GenerateRequest for ``spec`` sent as ``d``."""
    sampling = pb.SamplingParams(n=d.n, max_tokens=spec.max_tokens, temperature=0.0, stop=list(spec.stop))
    if d.logprobs is not None:
        sampling.logprobs = d.logprobs
    if spec.presence_penalty or spec.frequency_penalty:
        sampling.presence_penalty, sampling.frequency_penalty = spec.presence_penalty, spec.frequency_penalty
    sampling.ignore_eos = spec.ignore_eos
    if d.speculative is not None:
        sampling.speculative = d.speculative
    if spec.structured is not None:
        kind, value = spec.structured
        if kind == "choice":
            sampling.structured_outputs.choice.choices.extend(json.loads(value))
        else:
            setattr(sampling.structured_outputs, kind, value)
    if d.as_text:
        return pb.GenerateRequest(prompt=spec.prompt_text, sampling=sampling)
    return pb.GenerateRequest(token_ids=list(spec.prompt_ids), sampling=sampling)


# ---------------------------------------------------------------------------------------------- verification


def _first_difference(a: Sequence, b: Sequence) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _divergence(what: str, got: Sequence, want: Sequence, ref: Reference, tokens: bool) -> str:
    i = _first_difference(got, want)
    where = f"at {'token' if tokens else 'char'} {i}"
    if tokens and i < len(ref.gaps):
        where += f"; the reference's decision gap there {ref.gaps[i]:.2e} nats"
    return f"{what} differs {where}: got {got[max(0, i - 8) : i + 8]!r}, reference {want[max(0, i - 8) : i + 8]!r}"


def verify(spec: RequestSpec, ref: Reference, out: Outcome, n: int, *, complete: bool) -> list[str]:
    """Problems with what came back: a complete call must equal the reference (every one of its n samples);
    a cut-short one (cancel, disconnect, deadline) must be a prefix of it."""
    problems = []
    if complete and sorted(out.samples) != list(range(n)):
        problems.append(f"samples {sorted(out.samples)}, expected {n}")
    compare_tokens = not spec.stop  # with stop strings the text is what is defined
    for index, s in sorted(out.samples.items()):
        tag = f"sample {index}"
        if complete:
            if s.text != ref.text:
                problems.append(_divergence(f"{tag} text", s.text, ref.text, ref, tokens=False))
            if s.token_ids and compare_tokens and tuple(s.token_ids) != ref.token_ids:
                problems.append(_divergence(f"{tag} token ids", s.token_ids, ref.token_ids, ref, tokens=True))
            if s.finish_reason != ref.finish_reason:
                problems.append(f"{tag} finish_reason {s.finish_reason!r}, reference {ref.finish_reason!r}")
        else:
            if not ref.text.startswith(s.text):
                problems.append(_divergence(f"{tag} partial text", s.text, ref.text, ref, tokens=False))
            if compare_tokens and tuple(s.token_ids) != ref.token_ids[: len(s.token_ids)]:
                problems.append(_divergence(f"{tag} partial token ids", s.token_ids, ref.token_ids, ref, tokens=True))
    return problems


def logprob_deviation(spec: RequestSpec, ref: Reference, out: Outcome) -> float:
    """Largest |server - reference| logprob of the same chosen token (0 when none were returned)."""
    if spec.stop:
        return 0.0
    worst = 0.0
    for s in out.samples.values():
        for got, want in zip(s.logprobs, ref.logprobs, strict=False):
            if want > -9999.0:  # the HTTP API floors logprobs at -9999
                worst = max(worst, abs(got - want))
    return worst


# ---------------------------------------------------------------------------------------------- bookkeeping


@dataclass
class Stats:
    """Counters, failures and samples gathered while the load runs."""

    counts: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)  # the first MAX_FAILURE_MESSAGES messages
    failures_by_action: Counter = field(default_factory=Counter)
    max_logprob_deviation: float = 0.0
    max_logprob_where: str = ""
    health_probes: int = 0
    health_failures: list[str] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds since the load started, bytes)

    @property
    def num_failures(self) -> int:
        return sum(self.failures_by_action.values())

    def fail(self, action: str, message: str) -> None:
        self.failures_by_action[action] += 1
        if len(self.failures) < MAX_FAILURE_MESSAGES:
            self.failures.append(f"{action}: {message}")


@dataclass(frozen=True)
class Endpoints:
    """Where the server listens (loopback only) and its process id, when known (for RSS)."""

    http_url: str
    grpc_address: str
    pid: int | None = None

    @property
    def http_host_port(self) -> tuple[str, int]:
        parsed = urlparse(self.http_url)
        return parsed.hostname or "127.0.0.1", parsed.port or 80


@dataclass(frozen=True)
class ServerFacts:
    """What GetModelInfo says about the server (the bad requests and the reference are built from it)."""

    model_name: str
    vocab_size: int
    max_model_len: int
    page_size: int
    pages_total: int
    max_num_seqs: int
    kv_cache_dtype: str
    speculative_method: str


@dataclass
class SoakConfig:
    """The load: how long, how many workers, the mix of actions (weights), and the RSS bound."""

    duration: float = 60.0
    concurrency: int = 8
    seed: int = 0
    max_requests: int = 1_000_000
    warmup: float | None = None  # seconds of load before the RSS baseline (default: 10% of it, 10 to 120 s)
    think_time: float = 0.05  # mean seconds between a worker's calls (exponential)
    max_rss_growth_mb: float = 128.0
    idle_timeout: float = 30.0
    weights: dict[str, float] = field(
        default_factory=lambda: {"good": 0.55, "cancel": 0.12, "disconnect": 0.1, "deadline": 0.1, "bad": 0.13}
    )

    @property
    def warmup_seconds(self) -> float:
        return self.warmup if self.warmup is not None else min(120.0, max(10.0, 0.1 * self.duration))


@dataclass
class Soak:
    """Everything a worker needs: clients, the workload, the references and the running statistics."""

    config: SoakConfig
    endpoints: Endpoints
    facts: ServerFacts
    specs: list[RequestSpec]
    references: dict[RequestSpec, Reference]
    http: httpx.AsyncClient
    channel: grpc.aio.Channel
    stats: Stats = field(default_factory=Stats)
    started: int = 0

    @property
    def stub(self) -> pb_grpc.GenerationStub:
        return pb_grpc.GenerationStub(self.channel)


# ---------------------------------------------------------------------------------------------- transports


def _read_sse_event(out: Outcome, line: str) -> bool:
    """Folds one SSE line into ``out``; True when the stream is over ([DONE] or an error event)."""
    if not line.startswith("data: "):
        return False
    payload = line[len("data: ") :]
    if payload == "[DONE]":
        return True
    event = json.loads(payload)
    if "error" in event:
        out.status, out.error = "error", f"stream error event: {event['error']}"
        return True
    for choice in event.get("choices", []):
        s = out.sample(choice["index"])
        s.text += choice.get("text") or ""
        lp = choice.get("logprobs")
        if lp:
            s.logprobs += [v for v in lp["token_logprobs"] if v is not None]
        s.finish_reason = choice.get("finish_reason") or s.finish_reason
        if choice.get("text"):
            out.chunks += 1
    return False


def _read_http_json(out: Outcome, body: dict) -> None:
    for choice in body["choices"]:
        s = out.sample(choice["index"])
        s.text = choice["text"]
        if choice.get("logprobs"):
            s.logprobs = [v for v in choice["logprobs"]["token_logprobs"] if v is not None]
        s.finish_reason = choice.get("finish_reason")


async def http_generate(
    soak: Soak, body: dict, *, stop_after: int | None = None, deadline: float | None = None
) -> Outcome:
    """POSTs a completion; ``stop_after``: close the stream after that many chunks (a cancel); ``deadline``:
    give up after that many seconds, closing the connection (a client timeout)."""
    out = Outcome()
    url = f"{soak.endpoints.http_url}/v1/completions"
    try:
        async with asyncio.timeout(deadline if deadline is not None else GOOD_TIMEOUT):
            if body.get("stream"):
                async with soak.http.stream("POST", url, json=body) as response:
                    if response.status_code != 200:
                        await response.aread()
                        out.status, out.error = "error", f"HTTP {response.status_code}: {response.text[:300]}"
                        return out
                    async for line in response.aiter_lines():
                        if _read_sse_event(out, line):
                            return out
                        if stop_after is not None and out.chunks >= stop_after:
                            out.status = "cancelled"
                            return out  # leaving the block closes the response and its connection
                out.status, out.error = "error", "the stream ended without [DONE]"
            else:
                response = await soak.http.post(url, json=body)
                if response.status_code != 200:
                    out.status, out.error = "error", f"HTTP {response.status_code}: {response.text[:300]}"
                else:
                    _read_http_json(out, response.json())
    except TimeoutError:
        out.status = "deadline"
        if deadline is None:
            out.status, out.error = "error", f"no answer within {GOOD_TIMEOUT:g} s"
    return out


async def grpc_generate(
    stub: pb_grpc.GenerationStub,
    request: pb.GenerateRequest,
    *,
    stop_after: int | None = None,
    deadline: float | None = None,
) -> Outcome:
    """Streams a Generate call; ``stop_after``: cancel after that many responses with tokens; ``deadline``: the
    call's gRPC deadline (DEADLINE_EXCEEDED is then an expected end)."""
    out = Outcome()
    call = stub.Generate(request, timeout=deadline if deadline is not None else GOOD_TIMEOUT)
    try:
        async for response in call:
            s = out.sample(response.index)
            s.token_ids += response.token_ids
            s.text += response.text
            s.logprobs += [lp.logprob for lp in response.logprobs]
            s.finish_reason = response.finish_reason or s.finish_reason
            if response.token_ids:
                out.chunks += 1
            if stop_after is not None and out.chunks >= stop_after:
                call.cancel()
                out.status = "cancelled"
                return out
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and deadline is not None:
            out.status = "deadline"
        else:
            out.status, out.error = "error", f"gRPC {e.code().name}: {e.details()}"
    return out


async def deliver(
    soak: Soak,
    spec: RequestSpec,
    d: Delivery,
    rng: random.Random,
    *,
    stop_after: int | None = None,
    deadline: float | None = None,
) -> Outcome:
    if d.transport == "http":
        body = http_body(soak.facts.model_name, spec, d, rng)
        return await http_generate(soak, body, stop_after=stop_after, deadline=deadline)
    return await grpc_generate(soak.stub, grpc_request(spec, d), stop_after=stop_after, deadline=deadline)


# ---------------------------------------------------------------------------------------------- actions


def _check(soak: Soak, action: str, spec: RequestSpec, d: Delivery, out: Outcome, *, complete: bool) -> bool:
    """Verifies ``out`` against the reference; records a failure (and returns False) on any difference."""
    ref = soak.references[spec]
    problems = verify(spec, ref, out, d.n, complete=complete)
    deviation = logprob_deviation(spec, ref, out)
    if deviation > soak.stats.max_logprob_deviation:
        soak.stats.max_logprob_deviation, soak.stats.max_logprob_where = deviation, f"{d.transport} {spec_label(spec)}"
    if problems:
        soak.stats.fail(action, f"{d} {spec_label(spec)}: {'; '.join(problems)}")
        return False
    return True


def spec_label(spec: RequestSpec) -> str:
    prompt = spec.prompt_text if spec.prompt_text is not None else f"{len(spec.prompt_ids)} ids"
    extra = [f"max_tokens={spec.max_tokens}"]
    if spec.stop:
        extra.append(f"stop={list(spec.stop)}")
    if spec.structured:
        extra.append(f"{spec.structured[0]}={spec.structured[1][:40]!r}")
    if spec.presence_penalty or spec.frequency_penalty:
        extra.append(f"presence/frequency_penalty={spec.presence_penalty}/{spec.frequency_penalty}")
    if spec.ignore_eos:
        extra.append("ignore_eos")
    return f"[{prompt[-40:]!r} {' '.join(extra)}]"


def _count_served(soak: Soak, spec: RequestSpec, d: Delivery) -> None:
    c = soak.stats.counts
    c["served"] += 1
    c[f"served_{d.transport}"] += 1
    c["served_stream"] += d.stream
    c["served_n>1"] += d.n > 1
    c["served_logprobs"] += d.logprobs is not None
    c["served_stop"] += bool(spec.stop)
    c["served_structured"] += spec.structured is not None
    c["served_shared_prefix"] += spec.shared_prefix


async def do_good(soak: Soak, rng: random.Random) -> None:
    """A good request, run to its end and compared with the reference."""
    spec = rng.choice(soak.specs)
    d = random_delivery(rng, spec)
    out = await deliver(soak, spec, d, rng)
    if out.status != "ok":
        soak.stats.fail("good", f"{d} {spec_label(spec)}: {out.status} {out.error}")
    elif _check(soak, "good", spec, d, out, complete=True):
        _count_served(soak, spec, d)


async def do_cancel(soak: Soak, rng: random.Random) -> None:
    """A streamed request the client closes after 1-4 chunks; what came must be a prefix of the reference."""
    spec = rng.choice([s for s in soak.specs if s.max_tokens >= 32])
    d = random_delivery(rng, spec, stream=True)
    out = await deliver(soak, spec, d, rng, stop_after=rng.randint(1, 4))
    if out.status == "error":
        soak.stats.fail("cancel", f"{d} {spec_label(spec)}: {out.error}")
    elif _check(soak, "cancel", spec, d, out, complete=out.status == "ok"):
        soak.stats.counts["cancels" if out.status == "cancelled" else "cancels_finished_first"] += 1


async def do_disconnect(soak: Soak, rng: random.Random) -> None:
    """The connection drops mid-request: a raw HTTP socket closed (or reset) after 0-0.6 s, read or not, or a
    gRPC channel closed after 0-2 responses."""
    spec = rng.choice(soak.specs)
    d = random_delivery(rng, spec)
    if d.transport == "http":
        await _http_disconnect(soak, http_body(soak.facts.model_name, spec, d, rng), rng)
    else:
        await _grpc_disconnect(soak, spec, d, rng)
    soak.stats.counts["disconnects"] += 1
    soak.stats.counts[f"disconnects_{d.transport}"] += 1


async def _http_disconnect(soak: Soak, body: dict, rng: random.Random) -> None:
    host, port = soak.endpoints.http_host_port
    payload = json.dumps(body).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(head + payload)
        await writer.drain()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(rng.uniform(0.0, 0.6)):
                while await reader.read(4096):  # read some of the answer, or none
                    if rng.random() < 0.3:
                        break
    finally:
        if rng.random() < 0.5:
            writer.transport.abort()  # an RST rather than a FIN
        else:
            writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _grpc_disconnect(soak: Soak, spec: RequestSpec, d: Delivery, rng: random.Random) -> None:
    channel = grpc.aio.insecure_channel(soak.endpoints.grpc_address)
    out = Outcome()
    try:
        call = pb_grpc.GenerationStub(channel).Generate(grpc_request(spec, d), timeout=GOOD_TIMEOUT)
        wanted = rng.randint(0, 2)  # responses to read before the channel goes
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(rng.uniform(0.05, 0.6)):
                if wanted == 0:
                    await asyncio.sleep(1.0)  # the timeout ends it
                async for response in call:
                    s = out.sample(response.index)
                    s.token_ids += response.token_ids
                    s.text += response.text
                    out.chunks += 1
                    if out.chunks >= wanted:
                        break
    except grpc.aio.AioRpcError as e:
        soak.stats.fail("disconnect", f"{d} {spec_label(spec)}: gRPC {e.code().name}: {e.details()}")
    finally:
        await channel.close(grace=None)  # cancels the call in flight
    _check(soak, "disconnect", spec, d, out, complete=False)


async def do_deadline(soak: Soak, rng: random.Random) -> None:
    """A gRPC deadline or an HTTP client timeout of 50 ms to 1.5 s: the call either finishes in time (and must
    equal the reference) or is cut off (what came must be a prefix of it)."""
    spec = rng.choice(soak.specs)
    d = random_delivery(rng, spec)
    out = await deliver(soak, spec, d, rng, deadline=rng.uniform(0.05, 1.5))
    if out.status == "error":
        soak.stats.fail("deadline", f"{d} {spec_label(spec)}: {out.error}")
        return
    complete = out.status == "ok"
    if _check(soak, "deadline", spec, d, out, complete=complete):
        if complete:
            _count_served(soak, spec, d)
            soak.stats.counts["deadlines_met"] += 1
        else:
            soak.stats.counts["deadlines"] += 1
            soak.stats.counts[f"deadlines_{d.transport}"] += 1


async def do_bad(soak: Soak, rng: random.Random) -> None:
    """One of the bad requests; it must be refused with the expected 4xx / status code (never 5xx)."""
    case = rng.choice(bad_cases(soak.facts))
    problem = await send_bad(soak, case, rng)
    if problem:
        soak.stats.fail("bad", f"{case.name}: {problem}")
    else:
        soak.stats.counts["bad_inputs"] += 1
        soak.stats.counts[f"bad_{case.transport}"] += 1


ACTIONS: dict[str, Callable[[Soak, random.Random], Awaitable[None]]] = {
    "good": do_good,
    "cancel": do_cancel,
    "disconnect": do_disconnect,
    "deadline": do_deadline,
    "bad": do_bad,
}

# ---------------------------------------------------------------------------------------------- bad requests


@dataclass(frozen=True)
class BadCase:
    """A request the server must refuse: an HTTP ``body`` for ``path`` (a dict, or raw text: not JSON, or JSON
    with NaN) or a gRPC ``request``, and the status it must get."""

    name: str
    transport: str
    body: dict | str | None = None
    path: str = "/v1/completions"
    request: pb.GenerateRequest | None = None
    expect_http: int = 400
    expect_grpc: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT


_BAD_CACHE: dict[ServerFacts, list[BadCase]] = {}


def bad_cases(facts: ServerFacts) -> list[BadCase]:
    """Every bad request, built once per server from its limits (vocabulary, max_model_len, pool). gRPC has no
    "unknown field" case: protobuf keeps unknown fields aside by design, so the server never sees them."""
    if facts not in _BAD_CACHE:
        _BAD_CACHE[facts] = _http_bad_cases(facts) + _grpc_bad_cases(facts)
    return _BAD_CACHE[facts]


def _long_text(facts: ServerFacts) -> str:
    """More than max_model_len tokens, yet far fewer than the 64 characters a token the server checks first."""
    return "x = 1\n" * (facts.max_model_len // 2)


def _never_fits(facts: ServerFacts) -> bool:
    """Whether max_n samples at max_model_len tokens need more pages than the pool has."""
    return facts.max_num_seqs * math.ceil(facts.max_model_len / facts.page_size) > facts.pages_total


def _http_bad_cases(facts: ServerFacts) -> list[BadCase]:
    v, m = facts.vocab_size, facts.max_model_len
    completion_fields: list[tuple[str, dict]] = [
        ("temperature<0", {"temperature": -1}),
        ("temperature>float32", {"temperature": 1e39}),
        ("temperature not a number", {"temperature": "hot"}),
        ("top_p>1", {"top_p": 3.0}),
        ("top_p=0", {"top_p": 0}),
        ("n=0", {"n": 0}),
        ("n>max_n", {"n": 10**12}),
        ("n fractional", {"n": 2.5}),
        ("max_tokens=0", {"max_tokens": 0}),
        ("max_tokens<0", {"max_tokens": -5}),
        ("max_tokens>int64", {"max_tokens": 2**70}),
        ("min_tokens>max_tokens", {"min_tokens": 20, "max_tokens": 4}),
        ("logprobs>max", {"logprobs": 21}),
        ("logprobs<0", {"logprobs": -1}),
        ("presence_penalty>2", {"presence_penalty": 5}),
        ("repetition_penalty=0", {"repetition_penalty": 0}),
        ("seed<0", {"seed": -1}),
        ("seed>uint64", {"seed": 2**64}),
        ("top_k<-1", {"top_k": -5}),
        ("min_p>1", {"min_p": 2}),
        ("best_of!=n", {"best_of": 3}),
        ("suffix", {"suffix": "pass"}),
        ("logit_bias", {"logit_bias": {"5": 1.0}}),
        ("unknown field", {"foo": 1}),
        ("unknown fields", {"sampling": {"n": 2}, "beam_width": 4}),
        ("stop_token_ids outside vocab", {"stop_token_ids": [v + 1]}),
        ("stop_token_ids<0", {"stop_token_ids": [-1]}),
        ("empty stop string", {"stop": [""]}),
        ("too many stop strings", {"stop": [f"s{i}" for i in range(17)]}),
        ("regex does not compile", {"guided_regex": "(unclosed"}),
        ("empty regex", {"structured_outputs": {"regex": ""}}),
        ("empty choice", {"guided_choice": []}),
        ("schema does not compile", {"guided_json": {"type": "object", "properties": {"a": {"type": "strnig"}}}}),
        ("schema is not an object", {"guided_json": [1, 2]}),
        ("json_schema without a schema", {"response_format": {"type": "json_schema"}}),
        ("two constraints", {"guided_regex": "a", "response_format": {"type": "json_object"}}),
        ("prompt ids outside vocab", {"prompt": [1, v + 10]}),
        ("prompt ids < 0", {"prompt": [-3, 5]}),
        ("second prompt outside vocab", {"prompt": [[1, 5], [1, v + 5]]}),
        ("prompt ids too long", {"prompt": [5] * m}),
        ("prompt text too long", {"prompt": _long_text(facts)}),
        ("empty prompt", {"prompt": []}),
        ("empty prompt text", {"prompt": ""}),
        ("empty prompt in a list", {"prompt": [[]]}),
    ]
    model = facts.model_name
    cases = []
    for name, fields in completion_fields:
        for stream in (False, True):
            body = {"model": model, "prompt": "x = ", "max_tokens": 8, "stream": stream, **fields}
            cases.append(BadCase(f"http {name}{' (stream)' if stream else ''}", "http", body=body))
    hi = [{"role": "user", "content": "hi"}]
    chat_fields: list[tuple[str, dict]] = [
        ("no messages", {"messages": []}),
        ("top_logprobs without logprobs", {"messages": hi, "top_logprobs": 3}),
        ("image content", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
        ("auto tool choice without a parser", {"messages": hi, "tools": [_TOOL], "tool_choice": "auto"}),
        ("unknown tool", {"messages": hi, "tools": [_TOOL], "tool_choice": {"type": "function",
                                                                              "function": {"name": "nope"}}}),
        ("max_completion_tokens=0", {"messages": hi, "max_completion_tokens": 0}),
        ("messages text too long", {"messages": [{"role": "user", "content": _long_text(facts)}]}),
    ]  # fmt: skip
    for name, fields in chat_fields:
        cases.append(BadCase(f"http chat {name}", "http", body={"model": model, **fields}, path="/v1/chat/completions"))
    raw = [
        ("temperature=NaN", json.dumps({"model": model, "prompt": "x", "temperature": float("nan")})),
        ("body is not JSON", '{"model": "' + model + '", "prompt": '),
        ("body is a list", json.dumps([{"model": model, "prompt": "x"}])),
    ]
    cases += [BadCase(f"http {name}", "http", body=body) for name, body in raw]
    cases.append(BadCase("http unknown model", "http", body={"model": "gpt-5", "prompt": "x"}, expect_http=404))
    if _never_fits(facts):
        fields = {"prompt": [1, 5, 6], "n": facts.max_num_seqs, "max_tokens": m - 3, "ignore_eos": True}
        cases.append(BadCase("http never fits the pool", "http", body={"model": model, **fields}))
    return cases


_TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


def _grpc_bad_cases(facts: ServerFacts) -> list[BadCase]:
    v, m = facts.vocab_size, facts.max_model_len
    sp, request = pb.SamplingParams, pb.GenerateRequest
    sampling: list[tuple[str, pb.SamplingParams]] = [
        ("temperature<0", sp(temperature=-1)),
        ("temperature=inf", sp(temperature=math.inf)),
        ("temperature=nan", sp(temperature=math.nan)),
        ("top_p>1", sp(top_p=3.0)),
        ("top_p=0", sp(top_p=0.0)),
        ("n=0", sp(n=0)),
        ("n>max_n", sp(n=2**31 - 1)),
        ("max_tokens=0", sp(max_tokens=0)),
        ("max_tokens<0", sp(max_tokens=-2)),
        ("min_tokens>max_tokens", sp(min_tokens=9, max_tokens=3)),
        ("logprobs>max", sp(logprobs=21)),
        ("logprobs<0", sp(logprobs=-1)),
        ("prompt_logprobs<0", sp(prompt_logprobs=-1)),
        ("frequency_penalty<-2", sp(frequency_penalty=-7)),
        ("repetition_penalty=0", sp(repetition_penalty=0.0)),
        ("top_k<-1", sp(top_k=-5)),
        ("seed<0", sp(seed=-1)),
        ("min_p>1", sp(min_p=2.0)),
        ("stop_token_ids outside vocab", sp(stop_token_ids=[v + 1])),
        ("stop_token_ids<0", sp(stop_token_ids=[-1])),
        ("empty stop string", sp(stop=[""])),
        ("too many stop strings", sp(stop=[f"s{i}" for i in range(17)])),
        ("regex does not compile", sp(structured_outputs=pb.StructuredOutputs(regex="(u"))),
        ("schema is not JSON", sp(structured_outputs=pb.StructuredOutputs(json="{no"))),
        ("schema does not compile", sp(structured_outputs=pb.StructuredOutputs(json='{"type": "strnig"}'))),
        ("empty choice", sp(structured_outputs=pb.StructuredOutputs(choice=pb.ChoiceList()))),
        ("empty constraint", sp(structured_outputs=pb.StructuredOutputs())),
    ]
    prompts: list[tuple[str, pb.GenerateRequest]] = [
        ("token_ids outside vocab", request(token_ids=[1, v + 10])),
        ("token_ids<0", request(token_ids=[-3, 5])),
        ("token_ids too long", request(token_ids=[5] * m)),
        ("prompt text too long", request(prompt=_long_text(facts))),
        ("no prompt", request()),
        ("prompt and token_ids", request(prompt="x", token_ids=[1, 5])),
    ]
    cases = [BadCase(f"grpc {name}", "grpc", request=request(prompt="x", sampling=s)) for name, s in sampling]
    cases += [BadCase(f"grpc {name}", "grpc", request=r) for name, r in prompts]
    if _never_fits(facts):
        r = request(token_ids=[1, 5, 6], sampling=sp(n=facts.max_num_seqs, max_tokens=m - 3, ignore_eos=True))
        cases.append(
            BadCase("grpc never fits the pool", "grpc", request=r, expect_grpc=grpc.StatusCode.RESOURCE_EXHAUSTED)
        )
    return cases


async def send_bad(soak: Soak, case: BadCase, rng: random.Random) -> str | None:
    """Sends one bad request; returns what was wrong with the answer, or None when it was the expected refusal."""
    if case.transport == "http":
        url = f"{soak.endpoints.http_url}{case.path}"
        if isinstance(case.body, str):
            kwargs: dict[str, Any] = {"content": case.body, "headers": {"content-type": "application/json"}}
        else:
            kwargs = {"json": case.body}
        response = await soak.http.post(url, timeout=BAD_TIMEOUT, **kwargs)
        if response.status_code != case.expect_http:
            return f"HTTP {response.status_code} (expected {case.expect_http}): {response.text[:300]}"
        if "error" not in response.json():
            return f"HTTP {response.status_code} without an error body: {response.text[:300]}"
        return None
    assert case.request is not None
    try:
        async for _ in soak.stub.Generate(case.request, timeout=BAD_TIMEOUT):
            pass
    except grpc.aio.AioRpcError as e:
        if e.code() != case.expect_grpc:
            return f"gRPC {e.code().name} (expected {case.expect_grpc.name}): {e.details()}"
        return None
    return f"gRPC OK (expected {case.expect_grpc.name})"


# ---------------------------------------------------------------------------------------------- monitors


async def scrape(http: httpx.AsyncClient, endpoints: Endpoints) -> dict[str, float]:
    """The server's /metrics as {name{label=value,...}: value} (labels sorted; model_name left out)."""
    response = await http.get(f"{endpoints.http_url}/metrics", timeout=PROBE_TIMEOUT)
    response.raise_for_status()
    values = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model_name")
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


async def probe_health(http: httpx.AsyncClient, channel: grpc.aio.Channel, endpoints: Endpoints) -> str | None:
    """None when HTTP /health is 200 and gRPC health is SERVING; else what was seen."""
    try:
        response = await http.get(f"{endpoints.http_url}/health", timeout=PROBE_TIMEOUT)
        if response.status_code != 200:
            return f"/health {response.status_code}: {response.text[:200]}"
        stub = health_pb2_grpc.HealthStub(channel)
        status = (await stub.Check(health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT)).status
        if status != health_pb2.HealthCheckResponse.SERVING:
            return f"gRPC health {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"
    except (httpx.HTTPError, grpc.aio.AioRpcError) as e:
        return f"health probe failed: {e!r}"
    return None


async def monitor_health(soak: Soak, stop: asyncio.Event, start: float, interval: float = 1.0) -> None:
    while not stop.is_set():
        problem = await probe_health(soak.http, soak.channel, soak.endpoints)
        soak.stats.health_probes += 1
        if problem:
            soak.stats.health_failures.append(f"t={time.monotonic() - start:.1f}s: {problem}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


def tree_rss(pid: int) -> int:
    """Resident bytes of the process and its children."""
    process = psutil.Process(pid)
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += child.memory_info().rss
    return total


async def monitor_rss(soak: Soak, stop: asyncio.Event, start: float, interval: float = 1.0) -> None:
    pid = soak.endpoints.pid
    while pid is not None and not stop.is_set():
        try:
            soak.stats.rss.append((time.monotonic() - start, tree_rss(pid)))
        except psutil.Error as e:
            soak.stats.fail("rss", f"cannot read the server's RSS: {e!r}")
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


# ---------------------------------------------------------------------------------------------- the run


async def worker(soak: Soak, rng: random.Random, end: float) -> None:
    """Random calls, one at a time, with exponential pauses between them, until ``end``."""
    names, weights = list(soak.config.weights), list(soak.config.weights.values())
    while time.monotonic() < end and soak.started < soak.config.max_requests:
        soak.started += 1
        action = rng.choices(names, weights)[0]
        soak.stats.counts[f"calls_{action}"] += 1
        try:
            await ACTIONS[action](soak, rng)
        except Exception as e:  # noqa: BLE001 - a transport error or a bug here: reported, and the soak goes on
            soak.stats.fail(action, f"unexpected {e!r}")
        await asyncio.sleep(rng.expovariate(1.0 / soak.config.think_time))


async def server_facts(channel: grpc.aio.Channel) -> ServerFacts:
    info = await pb_grpc.GenerationStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=PROBE_TIMEOUT)
    return ServerFacts(
        model_name=info.model_name,
        vocab_size=info.vocab_size,
        max_model_len=info.max_model_len,
        page_size=info.page_size,
        pages_total=info.pages_total,
        max_num_seqs=info.max_num_seqs,
        kv_cache_dtype=info.kv_cache_dtype,
        speculative_method=info.speculative_method,
    )


@dataclass
class SoakReport:
    """The outcome of a soak: the statistics, the metrics before and after, and the checks."""

    config: SoakConfig
    facts: ServerFacts
    stats: Stats
    seconds: float
    before: dict[str, float]
    after: dict[str, float]
    idle_seconds: float | None
    final_health: str | None
    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(passed for _, passed, _ in self.checks)

    def delta(self, name: str) -> float:
        return self.after.get(name, 0.0) - self.before.get(name, 0.0)

    def rss_summary(self) -> dict[str, float] | None:
        """Bytes at the load's start, its peak and end, and ``low``: the least after the warm-up (the baseline
        the growth is measured from; a leak keeps the end above it), plus the least-squares slope after the
        warm-up in MiB per hour."""
        if not self.stats.rss:
            return None
        values = [v for _, v in self.stats.rss]
        settled = [(t, v) for t, v in self.stats.rss if t >= self.config.warmup_seconds] or self.stats.rss[-1:]
        return {
            "start": values[0],
            "peak": max(values),
            "end": values[-1],
            "low": min(v for _, v in settled),
            "slope_mib_per_hour": _slope(settled) * 3600 / 2**20,
        }

    def rss_series(self, step: float = 10.0) -> list[tuple[float, float]]:
        """(seconds, MiB) every ``step`` seconds, for the JSON report."""
        series, next_t = [], 0.0
        for t, v in self.stats.rss:
            if t >= next_t:
                series.append((round(t, 1), round(v / 2**20, 1)))
                next_t = t + step
        return series


def _slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (x, y) points (0 for fewer than two)."""
    if len(points) < 2:
        return 0.0
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    var = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var if var else 0.0


async def wait_idle(soak: Soak, timeout: float) -> tuple[float | None, dict[str, float]]:
    """Polls /metrics until no page is held and nothing runs or waits; (seconds it took or None, last scrape)."""
    start = time.monotonic()
    while True:
        metrics = await scrape(soak.http, soak.endpoints)
        idle = all(metrics.get(name, -1) == 0 for name in IDLE_GAUGES)
        if idle:
            return time.monotonic() - start, metrics
        if time.monotonic() - start > timeout:
            return None, metrics
        await asyncio.sleep(0.25)


IDLE_GAUGES = ("jserve:kv_cache_pages_used", "jserve:num_requests_running", "jserve:num_requests_waiting")


async def run_soak(
    config: SoakConfig,
    endpoints: Endpoints,
    specs: list[RequestSpec],
    references: dict[RequestSpec, Reference],
    *,
    log: Callable[[str], None] = print,
) -> SoakReport:
    """Runs the load for ``config.duration`` seconds, waits for the server to go idle, and checks it."""
    limits = httpx.Limits(max_connections=4 * config.concurrency + 8, max_keepalive_connections=2 * config.concurrency)
    async with (
        httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(GOOD_TIMEOUT)) as http,
        grpc.aio.insecure_channel(endpoints.grpc_address) as channel,
    ):
        facts = await server_facts(channel)
        soak = Soak(config, endpoints, facts, specs, references, http, channel)
        before = await scrape(http, endpoints)
        log(
            f"soak: {config.duration:g} s, {config.concurrency} workers, {len(specs)} distinct good requests, "
            f"{len(bad_cases(facts))} bad ones; server {facts.model_name}, kv {facts.kv_cache_dtype}, "
            f"speculation {facts.speculative_method or 'off'}, {facts.pages_total} pages of {facts.page_size}"
        )
        stop = asyncio.Event()
        start = time.monotonic()
        monitors = [
            asyncio.create_task(monitor_health(soak, stop, start)),
            asyncio.create_task(monitor_rss(soak, stop, start)),
            asyncio.create_task(progress(soak, stop, start, log)),
        ]
        end = start + config.duration
        rng = random.Random(config.seed)
        workers = [
            asyncio.create_task(worker(soak, random.Random(rng.random()), end)) for _ in range(config.concurrency)
        ]
        await asyncio.gather(*workers)
        seconds = time.monotonic() - start
        idle_seconds, after = await wait_idle(soak, config.idle_timeout)
        stop.set()
        await asyncio.gather(*monitors)
        final_health = await probe_health(http, channel, endpoints)
    report = SoakReport(config, facts, soak.stats, seconds, before, after, idle_seconds, final_health)
    report.checks = evaluate(report)
    return report


async def progress(soak: Soak, stop: asyncio.Event, start: float, log: Callable[[str], None]) -> None:
    """A line a minute, so a long run shows it is alive."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 60.0)
        if not stop.is_set():
            c = soak.stats.counts
            rss = f", rss {soak.stats.rss[-1][1] / 2**20:.0f} MiB" if soak.stats.rss else ""
            log(
                f"soak: t={time.monotonic() - start:.0f}s served {c['served']} cancels {c['cancels']} "
                f"disconnects {c['disconnects']} deadlines {c['deadlines']} bad {c['bad_inputs']} "
                f"failures {soak.stats.num_failures}{rss}"
            )


def evaluate(report: SoakReport) -> list[tuple[str, bool, str]]:
    """The soak's assertions: (name, passed, detail)."""
    s, c = report.stats, report.stats.counts
    failed = s.failures_by_action
    checks: list[tuple[str, bool, str]] = []

    def check(name: str, passed: bool, detail: str) -> None:
        checks.append((name, bool(passed), detail))

    compared = failed["good"] + failed["cancel"] + failed["disconnect"] + failed["deadline"]
    check(
        "outputs equal the reference",
        compared == 0 and c["served"] > 0,
        f"{c['served']} served; failures: good {failed['good']}, cancel {failed['cancel']}, "
        f"disconnect {failed['disconnect']}, deadline {failed['deadline']}",
    )
    check(
        "logprobs match the reference",
        s.max_logprob_deviation <= LOGPROB_TOLERANCE,
        f"max |delta| {s.max_logprob_deviation:.2e} nats (tolerance {LOGPROB_TOLERANCE:g}) {s.max_logprob_where}",
    )
    check("bad requests refused with 4xx / INVALID_ARGUMENT", failed["bad"] == 0,
          f"{c['bad_inputs']} as expected, {failed['bad']} not")  # fmt: skip
    other = s.num_failures - compared - failed["bad"]
    check("no other failure", other == 0, f"{other} ({', '.join(sorted(failed)) or 'none'})")
    total_failures = report.after.get("jserve:engine_step_failures_total", math.nan)
    step_failures = report.delta("jserve:engine_step_failures_total")
    check("no engine step failed", step_failures == 0, f"{step_failures:g} during the soak, {total_failures:g} in all")
    errors = report.delta("jserve:requests_total{outcome=error}")
    check("no request ended in an engine error", errors == 0, f"requests_total{{outcome=error}} +{errors:g}")
    used, running, waiting = (report.after.get(name, math.nan) for name in IDLE_GAUGES)
    idle = f"{report.idle_seconds:.2f} s after the load" if report.idle_seconds is not None else "never idle"
    check("no leaked pages, nothing running or waiting", report.idle_seconds is not None,
          f"pages used {used:g}, running {running:g}, waiting {waiting:g} ({idle})")  # fmt: skip
    check("health SERVING throughout", not s.health_failures and s.health_probes > 0,
          f"{s.health_probes} probes, {len(s.health_failures)} not serving {s.health_failures[:3]}")  # fmt: skip
    check("health SERVING at the end", report.final_health is None, report.final_health or "200 / SERVING")
    check(*_rss_check(report))
    lowered = report.delta("jserve:programs_lowered_while_serving_total")
    check("nothing compiled while serving", lowered == 0, f"{lowered:g} programs lowered")
    exercised = _exercised(report)
    missing = [k for k, v in exercised.items() if not v > 0]
    detail = ", ".join(f"{k} {v:g}" for k, v in exercised.items())
    if not report.facts.speculative_method:
        detail += "; speculation is off"
    check("composition exercised", not missing and bool(report.facts.speculative_method), detail)
    return checks


def _rss_check(report: SoakReport) -> tuple[str, bool, str]:
    rss = report.rss_summary()
    if rss is None:
        return "RSS bounded", False, "the server's pid is unknown (pass --pid): RSS not sampled"
    bound = report.config.max_rss_growth_mb
    growth = (rss["end"] - rss["low"]) / 2**20
    mib = " / ".join(f"{k} {rss[k] / 2**20:.0f}" for k in ("start", "peak", "end"))
    detail = (
        f"{mib} MiB; end {growth:+.0f} MiB over the lowest after the {report.config.warmup_seconds:g} s warm-up "
        f"(bound {bound:g})"
    )
    if report.seconds - report.config.warmup_seconds >= 600:  # a trend over less says little
        detail += f"; slope after it {rss['slope_mib_per_hour']:+.1f} MiB/h"
    return "RSS bounded", growth <= bound, detail


def _exercised(report: SoakReport) -> dict[str, float]:
    """How often each part of the composition happened (every one must have)."""
    c = report.stats.counts
    exercised = {
        "preemptions": report.delta("jserve:num_preemptions_total"),
        "prefix-cache hits": report.delta("jserve:prefix_cache_hits_total"),
        "structured served": c["served_structured"],
        "n>1 served": c["served_n>1"],
        "cancels": c["cancels"],
        "disconnects": c["disconnects"],
        "deadlines": c["deadlines"],
        "bad inputs": c["bad_inputs"],
    }
    if method := report.facts.speculative_method:
        exercised["draft tokens"] = report.delta(f"jserve:spec_decode_num_draft_tokens_total{{method={method}}}")
        exercised["accepted"] = report.delta(f"jserve:spec_decode_num_accepted_tokens_total{{method={method}}}")
    return exercised


def summary(report: SoakReport) -> str:
    """The human-readable result."""
    s, c = report.stats, report.stats.counts
    calls = ", ".join(f"{a} {c['calls_' + a]}" for a in ACTIONS)
    lines = [
        f"soak: {report.seconds:.0f} s of load, {sum(c['calls_' + a] for a in ACTIONS)} calls ({calls})",
        f"  served (complete, equal to the reference): {c['served']} (http {c['served_http']}, grpc "
        f"{c['served_grpc']}; stream {c['served_stream']}, n>1 {c['served_n>1']}, logprobs {c['served_logprobs']}, "
        f"stop {c['served_stop']}, structured {c['served_structured']}, shared prefix {c['served_shared_prefix']})",
        f"  cancels: {c['cancels']} (+{c['cancels_finished_first']} finished before the cancel)",
        f"  disconnects: {c['disconnects']} (http {c['disconnects_http']}, grpc {c['disconnects_grpc']})",
        f"  deadlines: {c['deadlines']} hit (http {c['deadlines_http']}, grpc {c['deadlines_grpc']}), "
        f"{c['deadlines_met']} met",
        f"  bad inputs refused as expected: {c['bad_inputs']} (http {c['bad_http']}, grpc {c['bad_grpc']})",
        f"  failures: {s.num_failures} {dict(s.failures_by_action) or ''}",
        f"  step failures {report.delta('jserve:engine_step_failures_total'):g}; preemptions "
        f"{report.delta('jserve:num_preemptions_total'):g}; prefix-cache hit rate "
        f"{report.after.get('jserve:prefix_cache_hit_rate', 0):.2f}; generated tokens "
        f"{report.delta('jserve:generation_tokens_total'):g}",
    ]
    lines += [f"  FAILURE {message}" for message in s.failures]
    if s.num_failures > len(s.failures):
        lines.append(f"  ... and {s.num_failures - len(s.failures)} more failures")
    lines += [f"  [{'PASS' if passed else 'FAIL'}] {name}: {detail}" for name, passed, detail in report.checks]
    lines.append(f"soak: {'PASSED' if report.ok else 'FAILED'}")
    return "\n".join(lines)


def report_json(report: SoakReport) -> dict[str, Any]:
    """The report as JSON (for --json-out)."""
    return {
        "seconds": report.seconds,
        "config": {k: v for k, v in vars(report.config).items()},
        "facts": vars(report.facts),
        "counts": dict(report.stats.counts),
        "failures": report.stats.failures,
        "num_failures": report.stats.num_failures,
        "max_logprob_deviation": report.stats.max_logprob_deviation,
        "health_probes": report.stats.health_probes,
        "health_failures": report.stats.health_failures,
        "rss": report.rss_summary(),
        "rss_mib_series": report.rss_series(),
        "metrics_after": report.after,
        "metrics_before": report.before,
        "idle_seconds": report.idle_seconds,
        "checks": [{"name": n, "passed": p, "detail": d} for n, p, d in report.checks],
        "ok": report.ok,
    }


# ---------------------------------------------------------------------------------------------- the server


_LISTEN = re.compile(r"jserve: listening on (?:https?://)?([\d.]+):(\d+)(/v1|/metrics)?")


class LaunchedServer:
    """``python -m jserve.launch`` on 127.0.0.1 with ports the server picks (read from its stdout)."""

    def __init__(self, flags: Sequence[str], log_path: Path):
        self.flags = ["--host", "127.0.0.1", "--port", "0", "--http-port", "0", "--no-progress", *flags]
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.grpc_port: int | None = None
        self.http_port: int | None = None
        self._ready = threading.Event()

    def start(self) -> None:
        """Starts the process (returns at once; ``wait_ready`` waits for it)."""
        log = open(self.log_path, "w")  # noqa: SIM115 - the child writes it; closed with the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jserve.launch", *self.flags],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            bufsize=1,
        )
        log.close()
        threading.Thread(target=self._read_stdout, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            if m := _LISTEN.search(line):
                if m.group(3) == "/v1":
                    self.http_port = int(m.group(2))
                elif m.group(3) is None:
                    self.grpc_port = int(m.group(2))
            if line.startswith("jserve: ready"):
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float = 600.0) -> Endpoints:
        if not self._ready.wait(timeout) or self.grpc_port is None or self.http_port is None:
            self.stop()
            raise RuntimeError(f"the server did not become ready; its log: {self.log_path}")
        assert self.proc is not None
        return Endpoints(f"http://127.0.0.1:{self.http_port}", f"127.0.0.1:{self.grpc_port}", self.proc.pid)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (a drain) and its exit code; killed (None) if it does not exit in time."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                return None
        return self.proc.returncode


KV_DTYPE_SETTING = {"int8": "int8", "float8_e4m3fn": "fp8"}
"""GetModelInfo's kv_cache_dtype -> the kv_cache_dtype setting that gives it (else "auto")."""


def flag(flags: Sequence[str], name: str) -> str:
    """The value that follows ``name`` in a flag list."""
    return flags[list(flags).index(name) + 1]


def pid_listening_on(port: int) -> int | None:
    """The pid of the local process listening on ``port`` (None if it cannot be seen)."""
    with contextlib.suppress(psutil.Error):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return conn.pid
    return None


def _loopback(host: str | None, what: str) -> None:
    if host not in LOOPBACK_HOSTS:
        raise SystemExit(f"soak: {what} must be a loopback address ({', '.join(LOOPBACK_HOSTS)}), got {host!r}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=300.0, help="seconds of load (default 300)")
    p.add_argument("--concurrency", type=int, default=8, help="workers, each one call at a time (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-requests", type=int, default=1_000_000, help="stop after this many calls")
    p.add_argument("--warmup", type=float, default=None, help="seconds before the RSS baseline (default 10%%)")
    p.add_argument("--max-rss-growth-mb", type=float, default=128.0, help="RSS growth bound (MiB, default 128)")
    p.add_argument("--url", default=None, help="HTTP base URL of a running server (else one is started)")
    p.add_argument("--grpc", default=None, help="with --url: the server's gRPC HOST:PORT")
    p.add_argument("--pid", type=int, default=None, help="with --url: the server's pid, for RSS (else looked up)")
    p.add_argument("--model", default=str(BUNDLED_MODEL), help="the served checkpoint (for the reference)")
    p.add_argument("--server-log", default=None, help="where a started server's stderr goes (default: a temp file)")
    p.add_argument("--json-out", default=None, help="also write the report as JSON here")
    ns = p.parse_args(argv)
    if (ns.url is None) != (ns.grpc is None):
        p.error("--url and --grpc go together")
    if ns.url is not None:
        _loopback(urlparse(ns.url).hostname, "--url")
        _loopback(ns.grpc.rsplit(":", 1)[0].strip("[]"), "--grpc")
    return ns


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(argv)
    from jserve.tokenizer import Tokenizer

    config = SoakConfig(
        duration=ns.duration,
        concurrency=ns.concurrency,
        seed=ns.seed,
        max_requests=ns.max_requests,
        warmup=ns.warmup,
        max_rss_growth_mb=ns.max_rss_growth_mb,
    )
    catalogue = build_catalogue(Tokenizer.from_pretrained(ns.model))
    server = None
    if ns.url is None:
        log_path = Path(ns.server_log or tempfile.mkstemp(prefix="jserve-soak-", suffix=".log")[1])
        server = LaunchedServer([*SERVER_FLAGS, "--model", ns.model], log_path)
        print(f"soak: starting python -m jserve.launch {' '.join(server.flags)} (log: {log_path})", flush=True)
        server.start()  # it compiles while the reference runs below
        max_model_len, page_size = int(flag(SERVER_FLAGS, "--max-model-len")), int(flag(SERVER_FLAGS, "--page-size"))
        kv_dtype = flag(SERVER_FLAGS, "--kv-cache-dtype")
    else:
        facts = asyncio.run(_facts(ns.grpc))
        max_model_len, page_size = facts.max_model_len, facts.page_size
        kv_dtype = KV_DTYPE_SETTING.get(facts.kv_cache_dtype, "auto")
    started = time.monotonic()
    try:
        specs, references = compute_references(
            catalogue, model=ns.model, max_model_len=max_model_len, kv_cache_dtype=kv_dtype, page_size=page_size
        )
        print(f"soak: references computed in {time.monotonic() - started:.0f} s", flush=True)
        if server is not None:
            endpoints = server.wait_ready()
            print(f"soak: server ready ({endpoints.http_url}, gRPC {endpoints.grpc_address})", flush=True)
        else:
            port = urlparse(ns.url).port or 80
            endpoints = Endpoints(ns.url.rstrip("/"), ns.grpc, ns.pid or pid_listening_on(port))
        report = asyncio.run(run_soak(config, endpoints, specs, references, log=lambda m: print(m, flush=True)))
    finally:
        exit_code = server.stop() if server is not None else 0
    if server is not None:
        report.checks.append(("server drained on SIGTERM (exit 0)", exit_code == 0, f"exit code {exit_code}"))
    print(summary(report), flush=True)
    if ns.json_out:
        Path(ns.json_out).write_text(json.dumps(report_json(report), indent=2, default=str))
    return 0 if report.ok else 1


async def _facts(address: str) -> ServerFacts:
    async with grpc.aio.insecure_channel(address) as channel:
        return await server_facts(channel)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds main(), whose finally stops the server it started


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    sys.exit(main())
