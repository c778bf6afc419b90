"""Tensor, pipeline, data and expert parallel layouts on 8 fake CPU devices: same greedy tokens as one device,
and parameters / KV pages really split."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jserve import LLM, SamplingParams
from jserve.parallel.sharding import shard_shape
from tests.checkpoints import make_checkpoint

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
COMMON = dict(
    dtype="float32",
    max_model_len=96,
    page_size=8,
    num_pages=96,
    max_num_seqs=8,
    max_num_batched_tokens=64,
    precompile=False,
)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    # 4 layers so pp=4 is possible; 4 heads / 2 kv heads so tp=4 replicates kv heads
    path, _ = make_checkpoint(
        "llama-gqa", tmp_path_factory.mktemp("par") / "llama", num_hidden_layers=4, initializer_range=0.1
    )
    return path


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    path, _ = make_checkpoint("mixtral", tmp_path_factory.mktemp("par") / "mixtral", initializer_range=0.1)
    return path


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(3, 500, size=int(n)).tolist() for n in (5, 17, 40, 9, 23)]


def _run(model_dir, prompts, **layout):
    llm = LLM(model=model_dir, **COMMON, **layout)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)
    stats = llm.stats()
    assert stats["pages_free"] == stats["pages_total"]
    return llm, [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def single(llama_dir, prompts):
    return _run(llama_dir, prompts)[1]


def test_eight_devices_are_visible():
    assert len(jax.devices()) == 8


@pytest.mark.parametrize(
    "layout",
    [
        dict(tensor_parallel_size=2),
        dict(tensor_parallel_size=4),
        dict(pipeline_parallel_size=2),
        pytest.param(dict(pipeline_parallel_size=4), marks=pytest.mark.slow),  # 4-way: the 2-way cases cover CI
        dict(tensor_parallel_size=2, pipeline_parallel_size=2),
        dict(data_parallel_size=2, tensor_parallel_size=2),
        pytest.param(dict(data_parallel_size=4), marks=pytest.mark.slow),
    ],
    ids=lambda d: "-".join(f"{k.split('_')[0]}{v}" for k, v in d.items()),
)
def test_layout_matches_single_device(llama_dir, prompts, single, layout):
    llm, tokens = _run(llama_dir, prompts, **layout)
    assert tokens == single
    tp = layout.get("tensor_parallel_size", 1)
    pp = layout.get("pipeline_parallel_size", 1)
    dp = layout.get("data_parallel_size", 1)
    replicas = llm.engine.replicas if dp > 1 else [llm.engine]
    assert len(replicas) == dp
    used = {d for r in replicas for st in r.runner.stages for d in st.mesh.devices.flat}
    assert len(used) == tp * pp * dp
    runner = replicas[0].runner
    assert runner.num_stages == pp
    params = runner.params()
    # column-parallel q (heads split), row-parallel o, vocab-parallel embedding, split mlp
    assert shard_shape(params["layers/0/attn/q_proj"]) == (64, 4 // tp, 16)
    assert shard_shape(params["layers/0/attn/o_proj"]) == (4 // tp, 16, 64)
    assert shard_shape(params["layers/0/mlp/down_proj"]) == (128 // tp, 64)
    assert shard_shape(params["embed/embedding"]) == (512 // tp, 64)
    kv_heads_per_device = 2 // tp if tp <= 2 else 2  # tp=4 > 2 kv heads: replicated
    for stage in runner.stages:  # each stage holds only its own layers' pages (96 each), on its own devices
        k_pages, v_pages = stage.kv_cache
        assert shard_shape(k_pages) == shard_shape(v_pages) == (kv_heads_per_device, 96 * 4 // pp, 8, 16)
        assert {d for d in k_pages.devices()} == set(stage.mesh.devices.flat)
    if dp > 1:
        assert all(r.stats()["prompt_tokens_computed"] > 0 for r in replicas)  # requests were spread


@pytest.mark.parametrize("layout", [dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)])
def test_scanned_layers_match_single_device(llama_dir, prompts, single, layout):
    """Stacked layer params (scan_layers) split like the per-layer ones, the stacking axis whole; each pipeline
    stage stacks its own layers."""
    llm, tokens = _run(llama_dir, prompts, scan_layers=True, **layout)
    assert tokens == single
    tp = layout.get("tensor_parallel_size", 1)
    pp = layout.get("pipeline_parallel_size", 1)
    for stage in llm.engine.runner.stages:
        stacked = {n: a for n, a in zip(stage.param_names, stage.param_leaves, strict=True) if n.startswith("stacked")}
        first = stage.layers.start  # a Llama's layers all look alike: one stack per stage
        assert shard_shape(stacked[f"stacked/{first}/attn/q_proj"]) == (4 // pp, 64, 4 // tp, 16)
        assert shard_shape(stacked[f"stacked/{first}/mlp/down_proj"]) == (4 // pp, 128 // tp, 64)
        assert {d for d in stacked[f"stacked/{first}/attn/q_proj"].devices()} == set(stage.mesh.devices.flat)
        per_layer = [a for n, a in zip(stage.param_names, stage.param_leaves, strict=True) if n.startswith("layers/")]
        assert all(a.ndim == 0 for a in per_layer)  # the per-layer copies are stubs


@pytest.mark.parametrize("tp", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_mixtral_expert_parallel_matches_single_device(mixtral_dir, prompts, tp):
    _, reference = _run(mixtral_dir, prompts)
    llm, tokens = _run(mixtral_dir, prompts, tensor_parallel_size=tp)
    assert tokens == reference
    params = llm.engine.runner.params()
    assert shard_shape(params["layers/0/mlp/gate_proj"]) == (4 // tp, 64, 64)  # experts split over devices
    assert shard_shape(params["layers/0/mlp/down_proj"]) == (4 // tp, 64, 64)


@pytest.mark.parametrize("family", [pytest.param("qwen3", marks=pytest.mark.slow), "qwen3-moe"])  # both: q/k norms
def test_qwen3_tensor_parallel_matches_single_device(family, prompts, tmp_path):
    """Qwen3's q/k norms and head_dim != hidden / heads split over tp=2; Qwen3-MoE's experts go one half per
    device (expert parallel) while its dense layer splits on mlp."""
    path, _ = make_checkpoint(family, tmp_path / family, initializer_range=0.1)
    _, reference = _run(path, prompts)
    llm, tokens = _run(path, prompts, tensor_parallel_size=2)
    assert tokens == reference
    params = llm.engine.runner.params()
    assert shard_shape(params["layers/0/attn/q_proj"]) == (64, 2, 32)  # 4 heads of 32 -> 2 per device
    if family == "qwen3-moe":
        assert shard_shape(params["layers/0/mlp/gate_proj"]) == (2, 64, 32)  # experts split over devices
        assert shard_shape(params["layers/1/mlp/gate_proj"]) == (64, 64)  # the dense layer: mlp 128 split


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        (dict(tensor_parallel_size=3), "tensor_parallel_size 3 must divide num_attention_heads 4"),
        (dict(tensor_parallel_size=8), "tensor_parallel_size 8 must divide num_attention_heads 4"),
        (dict(pipeline_parallel_size=8), "pipeline_parallel_size 8 must be <= num_hidden_layers 4"),
        (dict(data_parallel_size=4, tensor_parallel_size=4), "needs that many devices"),
        (dict(data_parallel_size=0), "data_parallel_size must be an integer >= 1"),
    ],
)
def test_invalid_layouts_are_clear_errors(llama_dir, layout, message):
    with pytest.raises(ValueError, match=message):
        LLM(model=llama_dir, **COMMON, **layout)


def test_print_plan_lists_every_param(llama_dir):
    from jserve.checkpoint import abstract_model
    from jserve.config import ModelConfig, ParallelConfig
    from jserve.parallel.mesh import make_mesh, stage_mesh
    from jserve.parallel.sharding import print_plan

    cfg = ModelConfig.from_pretrained(llama_dir)
    _, state = abstract_model(cfg, np.float32)
    mesh = stage_mesh(make_mesh(ParallelConfig(tensor_parallel_size=4, data_parallel_size=2)), 0, 0)
    text = print_plan(state, cfg, mesh)
    assert "layers/3/mlp/gate_proj" in text and "P(None, 'tp')" in text
    assert len(text.splitlines()) == 2 + len(jax.tree.leaves(state))


def test_pipeline_with_tied_embeddings_matches_single_device():
    # the bundled model ties its LM head to the embedding: the first and the last stage both need it
    kwargs = dict(max_model_len=64, num_pages=32, max_num_seqs=4, precompile=False)
    prompts = ["Hello there", "The quick brown fox", "One two three four five six"]
    single = LLM(**kwargs).generate(prompts, GREEDY, use_tqdm=False)
    piped = LLM(pipeline_parallel_size=2, tensor_parallel_size=2, **kwargs).generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in piped] == [o.outputs[0].token_ids for o in single]
