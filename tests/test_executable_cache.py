"""jserve's executable cache: programs load instead of rebuilding, keys follow what shapes a program, damaged
entries are rebuilt, and a warm engine start traces nothing and gives the same tokens."""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jserve import BUNDLED_MODEL, LLM, SamplingParams
from jserve.compilation_cache import ENTRY_SUFFIX
from jserve.executable_cache import ExecutableCache, entry_is_valid, program_key
from tests.lowerings import count_lowerings


def _scaled_sort(scale, x):
    return jnp.sort(x * scale, axis=-1)[:, ::-1]  # a sort: XLA:CPU's comparator is what once refused serializing


def _on(device_index: int, x: np.ndarray) -> jax.Array:
    mesh = Mesh(np.asarray(jax.devices()[device_index : device_index + 1]), ("tp",))
    return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))


def test_a_program_is_compiled_once_then_loaded(tmp_path):
    x = _on(3, np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32))  # not device 0: loads keep devices
    fn = jax.jit(functools.partial(_scaled_sort, 2.0))
    first = ExecutableCache(tmp_path)
    compiled = first.build(fn, (x,))
    assert first.loaded == 0 and len(list(tmp_path.glob(f"*{ENTRY_SUFFIX}"))) == 1
    second = ExecutableCache(tmp_path)
    with count_lowerings() as lowered:
        loaded = second.build(fn, (x,))
    assert second.loaded == 1 and lowered == []
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(compiled(x)))
    assert loaded(x).sharding.device_set == {jax.devices()[3]}


def test_keys_follow_shapes_dtypes_placement_and_static_arguments():
    x = np.zeros((4, 64), np.float32)
    fn = jax.jit(functools.partial(_scaled_sort, 2.0))
    key = program_key(fn, (_on(0, x),))
    assert key == program_key(jax.jit(functools.partial(_scaled_sort, 2.0)), (_on(0, x),))
    others = [
        program_key(fn, (_on(0, np.zeros((8, 64), np.float32)),)),
        program_key(fn, (_on(0, x.astype(np.int32)),)),
        program_key(fn, (_on(1, x),)),
        program_key(jax.jit(functools.partial(_scaled_sort, 3.0)), (_on(0, x),)),
        program_key(fn, (jax.ShapeDtypeStruct(x.shape, x.dtype),)),
    ]
    assert len({key, *others}) == 1 + len(others)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_a_damaged_entry_is_logged_deleted_and_rebuilt(tmp_path, caplog, damage):
    x = _on(0, np.arange(64, dtype=np.float32).reshape(2, 32))
    fn = jax.jit(functools.partial(_scaled_sort, -1.0))
    expected = np.asarray(ExecutableCache(tmp_path).build(fn, (x,))(x))
    (entry,) = tmp_path.glob(f"*{ENTRY_SUFFIX}")
    data = bytearray(entry.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = bytearray()
    entry.write_bytes(bytes(data))
    again = ExecutableCache(tmp_path)
    fn = jax.jit(functools.partial(_scaled_sort, -1.0))  # a new function: jax would hand back the program that ran
    with caplog.at_level(logging.WARNING, logger="jserve.executable_cache"):
        rebuilt = again.build(fn, (x,))
    assert again.loaded == 0 and "is damaged" in caplog.text
    np.testing.assert_array_equal(np.asarray(rebuilt(x)), expected)
    assert entry_is_valid(entry)


def test_a_dead_writers_temporary_file_is_removed(tmp_path):
    dead = tmp_path / f".abc{ENTRY_SUFFIX}.{2**22 + 1}.tmp"  # a pid above any pid_max: no process has it
    dead.write_bytes(b"half an entry")
    ExecutableCache(tmp_path)
    assert not dead.exists()


def test_a_warm_engine_start_loads_every_program_and_gives_the_same_tokens():
    """Two engines of one configuration in one process: the second traces and lowers nothing (every program
    comes from the cache the first filled or found), and its greedy tokens are the first's."""
    settings = dict(dtype="float32", max_model_len=128, max_num_batched_tokens=16, max_num_seqs=4, progress=False)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = ["def fibonacci(n):\n", "import os\n", "class Point:"]
    first = LLM(BUNDLED_MODEL, **settings)
    expected = [o.outputs[0].token_ids for o in first.generate(prompts, params, use_tqdm=False)]
    with count_lowerings() as lowered:
        second = LLM(BUNDLED_MODEL, **settings)
    assert [name for name in lowered if "step" in name] == []
    assert second.engine.runner.executables.loaded == second.stats()["num_programs"] > 0
    assert [o.outputs[0].token_ids for o in second.generate(prompts, params, use_tqdm=False)] == expected
    assert second.stats()["programs_lowered_while_serving"] == 0
