"""The engine's attention backend is chosen once from the model's shapes: "auto" never picks a kernel that
cannot take the model, and "pallas" says why it cannot run instead of failing inside a trace."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from jserve.attention import select as attention_select
from jserve.attention import select_backend
from jserve.attention.xla_work_items import XlaWorkItemsBackend
from jserve.engine.shapes import StepShapes
from pallas_kernels import dispatch


@pytest.fixture
def on_hopper(monkeypatch):
    """Pretend the device is a Hopper GPU (resolution only; nothing runs)."""
    monkeypatch.setattr(dispatch, "resolve_backend", lambda backend: "gpu" if backend == "auto" else backend)
    monkeypatch.setattr(attention_select, "resolve_backend", dispatch.resolve_backend)


class Resolved:
    def __init__(self, name: str):
        self.kernel, self.interpret = {"tpu-interpret": ("tpu", True)}.get(name, (name, False))


def resolve(choice, head_dim=128, page_size=16, dtype=jnp.bfloat16, platform="gpu", quantized_kv=False):
    return Resolved(
        attention_select.resolve_kernel(
            choice, head_dim=head_dim, page_size=page_size, dtype=dtype, platform=platform, quantized_kv=quantized_kv
        )
    )


def test_auto_on_hopper(on_hopper):
    assert resolve("auto").kernel == "gpu"
    assert resolve("auto", head_dim=80).kernel == "xla"  # wgmma tiles need head_dim % 64
    assert resolve("auto", page_size=24).kernel == "xla"  # a 64-key step would split a page
    assert resolve("auto", dtype=jnp.float32).kernel == "xla"  # the kernels' matmuls are bf16
    # int8 / fp8 pages: each page's scale row is one TMA copy of >= 128 bytes, so pages of >= 32 tokens
    assert resolve("auto", page_size=16, quantized_kv=True).kernel == "xla"
    assert resolve("auto", page_size=32, quantized_kv=True).kernel == "gpu"


def test_pallas_on_gpu_explains_what_it_cannot_take(on_hopper):
    assert resolve("pallas").kernel == "gpu"
    with pytest.raises(ValueError, match="head_dim=80"):
        resolve("pallas", head_dim=80)
    with pytest.raises(ValueError, match="multiple of 8"):
        resolve("pallas", page_size=4)
    with pytest.warns(UserWarning, match="bf16"):
        assert resolve("pallas", dtype=jnp.float32).kernel == "gpu"
    with pytest.raises(ValueError, match="page_size: .* >= 32 tokens"):
        resolve("pallas", page_size=16, quantized_kv=True)


def test_pallas_on_pre_hopper_gpu(monkeypatch):
    monkeypatch.setattr(attention_select, "resolve_backend", lambda backend: "xla")
    with pytest.raises(ValueError, match="Hopper"):
        resolve("pallas")


def test_cpu_and_tpu():
    assert resolve("auto", platform="cpu").kernel == "xla"
    assert resolve("auto", platform="tpu").kernel == "tpu"
    assert resolve("xla").kernel == "xla"
    cpu = resolve("pallas", platform="cpu")
    assert (cpu.kernel, cpu.interpret) == ("tpu", True)
    assert resolve("pallas", platform="tpu").kernel == "tpu"
    with pytest.raises(ValueError, match="attention_backend"):
        resolve("cuda")


def test_backend_objects():
    """One object per path; the XLA path takes work items, planned once per distinct sliding window."""
    shapes = StepShapes.from_limits(
        max_num_batched_tokens=64, max_num_seqs=4, max_model_len=128, page_size=16, banned_len=2
    )

    def pick(choice, windows=(None, None), platform="cpu"):
        return select_backend(
            choice, shapes, head_dim=64, sliding_windows=windows, dtype=jnp.float32, platform=platform
        )

    assert isinstance(pick("auto"), XlaWorkItemsBackend)
    assert pick("auto").sliding_windows == (None,)
    assert pick("auto", windows=(32, 32)).sliding_windows == (32,)
    mixed = pick("auto", windows=(32, None, 32, None))  # Gemma-style alternation: one plan per distinct window
    assert isinstance(mixed, XlaWorkItemsBackend) and mixed.sliding_windows == (32, None)
    assert pick("auto", windows=()).sliding_windows == (None,)
    assert pick("pallas").name == "pallas-tpu-interpret"
    assert pick("auto", platform="tpu").name == "pallas-tpu"
