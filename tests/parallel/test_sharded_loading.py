"""Sharded loading reads only each device's slice: host memory peaks near one shard, not one whole tensor."""

from __future__ import annotations

import gc
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np

from jserve import checkpoint
from jserve.checkpoint import abstract_model, load_hf_params
from jserve.config import ModelConfig, ParallelConfig
from jserve.parallel.mesh import make_mesh, stage_mesh
from jserve.parallel.sharding import param_shardings, shard_shape
from tests.checkpoints import make_checkpoint

VOCAB = 65536  # embedding and LM head: 65536 x 64 float32 = 16 MiB each, the largest tensors by far


def _peak_bytes(fn) -> int:
    """Host bytes held at the peak of ``fn`` beyond what its kept result still holds at the end.

    NOTE: on CPU, ``jax.device_put`` may alias a suitably aligned numpy buffer instead of copying it, so a
    loaded shard can stay a traced numpy allocation: that memory is the device array itself, not a host
    staging copy. Whether a buffer is aliased varies run to run, so the retained part is subtracted."""
    gc.collect()
    tracemalloc.start()
    try:
        fn()
        gc.collect()
        retained, peak = tracemalloc.get_traced_memory()
        return peak - retained
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


def test_each_slice_goes_to_its_device_before_the_next_is_read(tmp_path, monkeypatch):
    """The order that keeps the host peak near one shard, checked directly (the peak test above cannot see a
    loader that reads every slice first when CPU device_put aliases the slices it is given)."""
    path, _ = make_checkpoint("llama-gqa", tmp_path / "ckpt")
    cfg = ModelConfig.from_pretrained(path)
    mesh = stage_mesh(make_mesh(ParallelConfig(tensor_parallel_size=8)), 0, 0)
    _, abstract = abstract_model(cfg, jnp.float32)
    events: list[str] = []
    read_slice, device_put = checkpoint._TensorReader.read_slice, jax.device_put

    def traced_read(self, name, index):
        events.append("read")
        return read_slice(self, name, index)

    def traced_put(x, *args, **kwargs):
        events.append("put")
        return device_put(x, *args, **kwargs)

    monkeypatch.setattr(checkpoint._TensorReader, "read_slice", traced_read)
    monkeypatch.setattr(checkpoint.jax, "device_put", traced_put)
    load_hf_params(path, cfg, jnp.float32, param_shardings(abstract, cfg, mesh))
    runs = "".join("r" if e == "read" else "p" for e in events)
    assert runs.count("p") >= 8 and "rrrrrrrr" not in runs, runs  # never 8 slices read before putting
