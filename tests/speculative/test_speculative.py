"""Speculative decoding end to end on the bundled trained model: every method against plain decoding.

One plain engine and one engine per method (n-gram, early exit, the bundled draft model) with the same small
settings serve every test here: 8 sequences, a 64-token step budget (long prompts prefill in chunks) and a pool
small enough that 64 requests force preemptions. float32, so CPU greedy choices are reproducible.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections import Counter

import pytest

from jserve import BUNDLED_DRAFT_MODEL, BUNDLED_MODEL, LLM, SamplingParams
from jserve.speculative.policy import FIRST_PROBE
from jserve.stdlib_corpus import function_sources, repeat_prompt
from tests.engine.workloads import assert_no_leak
from tests.lowerings import count_lowerings

SETTINGS = dict(
    dtype="float32",
    max_num_seqs=8,
    max_num_batched_tokens=64,
    max_model_len=384,
    num_pages=48,
    progress=False,
)
K = 3
METHODS = {"ngram": "ngram", "early_exit": "early_exit", "draft": str(BUNDLED_DRAFT_MODEL)}


_ENGINES: dict[str, tuple] = {}


def plain_engine() -> LLM:
    """The plain engine, shared with tests/structured when both modules run in one worker process."""
    if "plain" not in _ENGINES:
        _ENGINES["plain"] = LLM(BUNDLED_MODEL, **SETTINGS)
    return _ENGINES["plain"]


@pytest.fixture(scope="module")
def plain():
    return plain_engine()


def _speculative_engine(method: str) -> tuple[str, LLM, list]:
    """One engine per method for the whole module (with the programs it lowered while building)."""
    if method not in _ENGINES:
        with count_lowerings() as lowered:
            llm = LLM(
                BUNDLED_MODEL,
                speculative_model=METHODS[method],
                num_speculative_tokens=K,
                speculative_max_batch_size=8,
                speculative_adaptive=False,  # these tests verify drafts: every request drafts whenever it can
                **SETTINGS,
            )
        _ENGINES[method] = (method, llm, lowered)
    return _ENGINES[method]


@pytest.fixture(scope="module", params=list(METHODS))
def speculative(request):
    return _speculative_engine(request.param)


def _prompts(n: int) -> list[str]:
    """Half input-grounded (a function to repeat), half free completion (a function's first lines)."""
    functions = list(itertools.islice(function_sources(max_lines=14), n))
    out = []
    for i, (name, source) in enumerate(functions):
        out.append(repeat_prompt(name, source) if i % 2 == 0 else "\n".join(source.splitlines()[:3]) + "\n")
    return out


def _mixed_params(i: int) -> SamplingParams:
    """Greedy requests with the options that must compose with speculation."""
    options: dict = dict(temperature=0.0, max_tokens=8 + (i * 7) % 33)
    if i % 5 == 1:
        options["logprobs"] = 2
    if i % 7 == 2:
        options["repetition_penalty"] = 1.3
    if i % 9 == 3:
        options["n"] = 2
    if i % 11 == 4:
        options["stop"] = ["\n\n"]
    if i % 13 == 5:
        options["speculative"] = False
    return SamplingParams(**options)


def _same(a, b, *, logprob_tol: float = 2e-4) -> None:
    for x, y in zip(a.outputs, b.outputs, strict=True):
        assert x.token_ids == y.token_ids, (a.request_id, x.token_ids, y.token_ids)
        assert x.text == y.text and x.finish_reason == y.finish_reason
        if x.logprobs is not None:
            for lx, ly in zip(x.logprobs, y.logprobs, strict=True):
                assert lx.keys() == ly.keys()
                assert max(abs(lx[t] - ly[t]) for t in lx) < logprob_tol


def test_greedy_outputs_match_plain_decoding(plain, speculative):
    """64 mixed requests (chunked prefill, preemption, penalties, n=2, logprobs, stop strings, an opted-out
    request): token for token what plain decoding gives, with drafts accepted and nothing lowered."""
    method, llm, lowered = speculative
    prompts = _prompts(64)
    params = [_mixed_params(i) for i in range(64)]
    expected = plain.generate(prompts, params, use_tqdm=False)
    before = llm.stats()
    got = llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(got, expected, strict=True):
        _same(a, b)
    stats = llm.stats()
    assert stats["num_preemptions"] > before["num_preemptions"]
    assert stats["spec_method"] == method
    assert stats["spec_num_accepted_tokens"] > before["spec_num_accepted_tokens"] > -1
    assert 0 < stats["spec_acceptance_rate"] <= 1 and stats["spec_mean_accepted_length"] > 1
    assert stats["programs_lowered_while_serving"] == 0
    # a few programs more than plain decoding: verification for buckets 8, 16, 32 (8 rows x 4 positions),
    # and the device drafter; every one built before LLM() returned. (Plain decoding also has structured
    # outputs' deferred-sampling programs, which a speculative engine does without: it steps synchronously.)
    plain_steps = plain.stats()["num_programs"] - len(plain.engine.runner.sample_programs)
    assert stats["num_programs"] == plain_steps + 3 + (method != "ngram")
    built = len([name for name in lowered if "_stage_step" in name or "_propose" in name])
    assert built + llm.engine.runner.executables.loaded == stats["num_programs"]  # the rest: loaded from the cache
    opted_out = [o for o, p in zip(got, params, strict=True) if not p.speculative]
    assert opted_out and all(o.metrics.num_draft_tokens == 0 for o in opted_out)
    assert sum(o.metrics.num_accepted_tokens for o in got) > 0
    assert_no_leak(llm)
    llm.engine.kv_cache.check_invariants()


def test_max_tokens_and_stop_strings_inside_an_accepted_run(plain, speculative):
    """Repeating a function accepts long runs; max_tokens and a stop string that land inside one truncate the
    output exactly where plain decoding stops."""
    _, llm, _ = speculative
    name, source = next(iter(function_sources(min_lines=8, max_lines=14)))
    prompt = repeat_prompt(name, source)
    body = source.splitlines()[1:]
    word = body[1].split()[0] if body[1].split() else "return"
    cases = [SamplingParams(temperature=0.0, max_tokens=m) for m in (2, 3, 5, 7, 11)]
    cases += [SamplingParams(temperature=0.0, max_tokens=40, stop=[s]) for s in (word, "\n    ", ":", body[2][-3:])]
    expected = plain.generate([prompt] * len(cases), cases, use_tqdm=False)
    before = llm.stats()["spec_num_accepted_tokens"]
    got = llm.generate([prompt] * len(cases), cases, use_tqdm=False)
    for a, b in zip(got, expected, strict=True):
        _same(a, b)
    assert sum(o.metrics.num_accepted_tokens for o in got) >= 5
    # accepted drafts that a stop token, a stop string or max_tokens dropped are not counted: every counted one
    # is in the output (whose first token came from the prompt's step, never a draft)
    assert all(o.metrics.num_accepted_tokens <= len(o.outputs[0].token_ids) - 1 for o in got)
    assert llm.stats()["spec_num_accepted_tokens"] - before == sum(o.metrics.num_accepted_tokens for o in got)
    assert_no_leak(llm)


def test_abort_mid_verification_frees_every_page(speculative):
    _, llm, _ = speculative
    engine = llm.engine
    name, source = next(iter(function_sources(min_lines=8, max_lines=14)))
    ids = [
        engine.add_request(
            llm.tokenizer.encode(repeat_prompt(name, source), True), SamplingParams(temperature=0.0, max_tokens=64)
        )
    ]
    ids.append(
        engine.add_request(llm.tokenizer.encode(source, True), SamplingParams(temperature=0.7, max_tokens=64, seed=1))
    )
    for _ in range(200):
        step = engine.begin_step()
        verifying = step.plans is not None and any(p.is_verification for p in step.plans)
        if verifying and engine.num_steps > 3:
            for rid in ids:
                engine.abort_request(rid)
            engine.finish_step(step)
            break
        engine.finish_step(step)
    else:
        pytest.fail("no verification step was dispatched")
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert {o.request_id for o in outputs if o.finished} == set(ids)
    assert all(o.outputs[0].finish_reason == "abort" for o in outputs if o.finished)
    engine.kv_cache.check_invariants()
    assert_no_leak(llm)


def test_random_arrivals_and_aborts_leak_nothing(speculative):
    _, llm, _ = speculative
    engine = llm.engine
    rng = random.Random(0)
    prompts = _prompts(24)
    live: list[str] = []
    for _ in range(400):
        if prompts and rng.random() < 0.3:
            temperature = rng.choice([0.0, 0.8])
            params = SamplingParams(temperature=temperature, max_tokens=rng.randint(1, 40), top_k=rng.choice([0, 5]))
            live.append(engine.add_request(llm.tokenizer.encode(prompts.pop(), True), params))
        if live and rng.random() < 0.08:
            engine.abort_request(live.pop(rng.randrange(len(live))))
        engine.step()
        if not prompts and not engine.has_unfinished():
            break
    while engine.has_unfinished():
        engine.step()
    engine.kv_cache.check_invariants()
    assert_no_leak(llm)
    assert llm.stats()["programs_lowered_while_serving"] == 0


def _joint(llm: LLM, prompt: str, n: int) -> Counter:
    params = [SamplingParams(temperature=1.0, top_k=3, max_tokens=4, seed=s, ignore_eos=True) for s in range(n)]
    outs = llm.generate([prompt] * n, params, use_tqdm=False)
    return Counter(tuple(o.outputs[0].token_ids[:3]) for o in outs)


def _tv(a: Counter, b: Counter) -> float:
    na, nb = sum(a.values()), sum(b.values())
    return 0.5 * sum(abs(a[x] / na - b[x] / nb) for x in set(a) | set(b))


SAMPLES = 800
NGRAM_IN_CI = ["ngram", *(pytest.param(m, marks=pytest.mark.slow) for m in ("early_exit", "draft"))]
JOINT_TV_BOUND = 0.15


@pytest.mark.parametrize("method", NGRAM_IN_CI)
def test_sampling_is_lossless(plain, method):
    """Temperature 1, top-k 3: the joint law of the first three tokens with speculation equals plain sampling's.

    The bound: two independent samples of 800 draws of the same law differ by TV ~0.06-0.09 on this prompt
    (~25 outcomes). Accepting drafts too often moves the law by far more: verifying with a q twice too small
    (accepting min(1, 2p/q)) fails tests/speculative/test_verify.py's bound of the same kind by 10x, and on this prompt
    accept-always (every draft kept) measured TV ~0.3 for early exit when we tried it. The draft model shares
    early exit's path (device drafts with their q); its run is the slow-marked variant.
    """
    _, llm, _ = _speculative_engine(method)
    name, source = next(iter(function_sources(min_lines=8, max_lines=14)))
    prompt = repeat_prompt(name, source)
    before = llm.stats()["spec_num_draft_tokens"]
    with_spec = _joint(llm, prompt, SAMPLES)
    assert llm.stats()["spec_num_draft_tokens"] > before + SAMPLES  # the draws did go through verification
    without = _joint(plain, prompt, SAMPLES)
    assert _tv(with_spec, without) < JOINT_TV_BOUND


SPEC_LAYOUTS = [
    ("ngram", dict(tensor_parallel_size=2)),
    *(
        pytest.param(method, dict(tensor_parallel_size=2, data_parallel_size=2), marks=pytest.mark.slow)
        for method in ("ngram", "early_exit", "draft")
    ),
]


@pytest.mark.parametrize("method, layout", SPEC_LAYOUTS)
def test_tensor_and_data_parallel_layouts(plain, method, layout):
    """dp=2 x tp=2: each replica drafts and verifies on its own two devices (device drafters: draft params and
    pages split by kv head like the target's); greedy outputs are plain decoding's. CI runs n-gram at tp=2 (the
    dp=2 x tp=2 case took ~60 s of CI's 2 cores; the device drafters' programs take minutes here: slow)."""
    llm = LLM(
        BUNDLED_MODEL,
        speculative_model=METHODS[method],
        num_speculative_tokens=K,
        speculative_max_batch_size=8,
        speculative_adaptive=False,
        **layout,
        **SETTINGS,
    )
    prompts = _prompts(12)
    params = SamplingParams(temperature=0.0, max_tokens=24)
    expected = plain.generate(prompts, params, use_tqdm=False)
    for a, b in zip(llm.generate(prompts, params, use_tqdm=False), expected, strict=True):
        _same(a, b)
    stats = llm.stats()
    assert stats.get("num_replicas", 1) == layout.get("data_parallel_size", 1) and stats["spec_num_accepted_tokens"] > 0
    assert stats["programs_lowered_while_serving"] == 0


def test_policy_turns_speculation_off_for_large_batches(speculative):
    """With speculative_max_batch_size 2, nobody drafts while more than two sequences run. (With a draft model a
    request whose tokens were computed above the limit stays plain: the draft skipped them.)"""
    method, llm, _ = speculative
    engine = llm.engine
    original, real_draft = engine.speculative, engine._draft
    seen: list[tuple[int, bool]] = []

    def spy(*args) -> None:
        real_draft(*args)
        running = engine.scheduler.running
        seen.append((len(running), any(r.draft_token_ids or r.chain_drafts for r in running)))

    engine.speculative = dataclasses.replace(original, max_batch_size=2)
    engine._draft = spy
    try:
        prompts = _prompts(6)
        params = [SamplingParams(temperature=0.0, max_tokens=12 + 8 * i) for i in range(6)]
        llm.generate(prompts, params, use_tqdm=False)
    finally:
        engine.speculative, engine._draft = original, real_draft
    assert any(n > 2 for n, _ in seen)
    assert all(n <= 2 for n, drafted in seen if drafted)
    assert any(drafted for _, drafted in seen) or method == "draft"
    assert_no_leak(llm)


@pytest.fixture
def adaptive(speculative):
    """The method's engine with adaptive speculation on (as ``speculative_adaptive=True`` builds it: the step
    costs measured once, from the compiled programs), restored afterwards."""
    method, llm, lowered = speculative
    controller = llm.engine._speculation
    fixed = controller.config
    controller.config = dataclasses.replace(fixed, adaptive=True)
    llm.engine.runner.measure_step_costs()
    yield method, llm
    controller.config = fixed


def test_adaptive_speculation_matches_plain_and_drafts_where_it_pays(plain, adaptive):
    """Whatever the policy decides step by step (draft, sit out, decode plainly, probe), every token is plain
    decoding's, nothing is lowered and nothing leaks; copying a function at batch 1 drafts and accepts."""
    method, llm = adaptive
    lowered_before = llm.stats()["programs_lowered_while_serving"]  # (other tests share the engine)
    prompts = _prompts(16)
    params = [_mixed_params(i) for i in range(16)]
    can_pay = llm.engine._speculation.drafting_can_pay(1)  # (else probes come every MAX_PROBE steps only)
    expected = plain.generate(prompts, params, use_tqdm=False)
    got = llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(got, expected, strict=True):
        _same(a, b)
    name, source = next(iter(function_sources(min_lines=8, max_lines=14)))
    copy = SamplingParams(temperature=0.0, max_tokens=96)
    single = llm.generate([repeat_prompt(name, source)], copy, use_tqdm=False)[0]
    _same(single, plain.generate([repeat_prompt(name, source)], copy, use_tqdm=False)[0])
    # A lookup of the copied text is accepted at ~90%, which pays at batch 1: the request drafts, at the latest
    # when it is first probed. (The probe spacing follows the measured costs: on a machine so loaded that a
    # verification step costs several plain ones, the first probe may come after the last token: no claim then.)
    first_probe = max(FIRST_PROBE, llm.engine._speculation._probe_spacing())
    if method == "ngram" and can_pay and first_probe < copy.max_tokens - 8:
        assert single.metrics.num_accepted_tokens > 0, f"no drafts accepted (first probe at step {first_probe:.0f})"
    assert llm.stats()["programs_lowered_while_serving"] == lowered_before
    assert_no_leak(llm)
    llm.engine.kv_cache.check_invariants()


def test_more_sequences_than_a_verification_bucket_holds(plain):
    """max_num_seqs above the smallest verification bucket's tokens (16 rows, buckets of 8 and 16): every
    verification program takes all the engine's rows. (They were compiled for the bucket's rows, and every
    verification step of such an engine failed.)"""
    llm = LLM(
        BUNDLED_MODEL,
        speculative_model="ngram",
        num_speculative_tokens=K,
        speculative_adaptive=False,
        **{**SETTINGS, "max_num_seqs": 16},
    )
    prompts = _prompts(6)
    params = SamplingParams(temperature=0.0, max_tokens=24)
    for a, b in zip(
        llm.generate(prompts, params, use_tqdm=False), plain.generate(prompts, params, use_tqdm=False), strict=True
    ):
        _same(a, b)
    stats = llm.stats()
    assert stats["spec_num_drafting_rows"] > 0 and stats["num_step_failures"] == 0
    assert stats["programs_lowered_while_serving"] == 0
