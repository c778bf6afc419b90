"""Two local processes joined with jax.distributed on loopback run one tensor-parallel engine over 4 devices
(2 each) and return the same tokens as one process; the follower stays in lockstep through inbox broadcasts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jserve import LLM, SamplingParams
from tests.checkpoints import make_checkpoint

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], list(range(20, 61))]
LLM_KWARGS = dict(
    dtype="float32",
    max_model_len=96,
    page_size=8,
    num_pages=64,
    max_num_seqs=4,
    max_num_batched_tokens=64,
    precompile=False,
)

WORKER = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    from jserve.parallel import multihost
    multihost.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
    from jserve import LLM, SamplingParams
    llm = LLM(model=sys.argv[3], tensor_parallel_size=4, **json.loads(sys.argv[4]))
    engine = llm.engine
    engine.inbox_sync = multihost.broadcast_items
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    if multihost.is_leader():  # only the leader gets requests; the follower learns them from the broadcasts
        outs = llm.generate(prompt_token_ids=json.loads(sys.argv[5]), sampling_params=params, use_tqdm=False)
        multihost.stop_followers(engine)
        print("TOKENS", json.dumps([o.outputs[0].token_ids for o in outs]), flush=True)
        print("STEPS", engine.num_steps, flush=True)
    else:
        multihost.follow(engine)
        print("STEPS", engine.num_steps, flush=True)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path, _ = make_checkpoint("llama-gqa", tmp_path_factory.mktemp("mh") / "llama", initializer_range=0.1)
    return path


def test_two_processes_match_one(model_dir, tmp_path):
    single = LLM(model=model_dir, **LLM_KWARGS).generate(
        prompt_token_ids=PROMPTS,
        sampling_params=SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
        use_tqdm=False,
    )
    expected = [o.outputs[0].token_ids for o in single]

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    address = f"127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                address,
                str(i),
                str(model_dir),
                json.dumps(LLM_KWARGS),
                json.dumps(PROMPTS),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=240)
            outputs.append(out)
            assert p.returncode == 0, out[-3000:]
    finally:
        for p in procs:
            p.kill()
    tokens = [line for line in outputs[0].splitlines() if line.startswith("TOKENS")]
    assert tokens and json.loads(tokens[0].split(" ", 1)[1]) == expected
    steps = [[line for line in out.splitlines() if line.startswith("STEPS")] for out in outputs]
    assert steps[0] and steps[0] == steps[1]  # the follower ran every device step the leader ran
