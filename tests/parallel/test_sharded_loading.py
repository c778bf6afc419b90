"""Sharded loading reads only each device's slice: host memory peaks near one shard, not one whole tensor."""

from __future__ import annotations

import gc
import tracemalloc

import jax.numpy as jnp
import numpy as np

from jserve.checkpoint import abstract_model, load_hf_params
from jserve.config import ModelConfig, ParallelConfig
from jserve.parallel.mesh import make_mesh, stage_mesh
from jserve.parallel.sharding import param_shardings, shard_shape
from tests.checkpoints import make_checkpoint

VOCAB = 65536  # embedding and LM head: 65536 x 64 float32 = 16 MiB each, the largest tensors by far


def _peak_bytes(fn) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_each_device_reads_only_its_shard(tmp_path):
    path, model = make_checkpoint("llama-gqa", tmp_path / "big-vocab", vocab_size=VOCAB)
    cfg = ModelConfig.from_pretrained(path)
    tensor_bytes = VOCAB * cfg.hidden_size * 4
    mesh = stage_mesh(make_mesh(ParallelConfig(tensor_parallel_size=8)), 0, 0)
    _, abstract = abstract_model(cfg, jnp.float32)
    shardings = param_shardings(abstract, cfg, mesh)

    loaded = {}
    sharded_peak = _peak_bytes(lambda: loaded.update(state=load_hf_params(path, cfg, jnp.float32, shardings)[1]))
    whole_peak = _peak_bytes(lambda: load_hf_params(path, cfg, jnp.float32))

    embedding = loaded["state"]["embed"]["embedding"][...]
    assert shard_shape(embedding) == (VOCAB // 8, cfg.hidden_size)
    np.testing.assert_array_equal(np.asarray(embedding), model.model.embed_tokens.weight.detach().numpy())
    lm_head = loaded["state"]["lm_head"][...]
    np.testing.assert_array_equal(np.asarray(lm_head), model.lm_head.weight.detach().numpy().T)
    # one shard is 2 MiB: the sharded load never holds a whole 16 MiB tensor on the host
    assert sharded_peak < tensor_bytes / 2, (sharded_peak, tensor_bytes)
    assert whole_peak >= tensor_bytes, (whole_peak, tensor_bytes)
