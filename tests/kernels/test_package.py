"""pallas_kernels as a package: self-contained, entry points route correctly, reference matches float64."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import compat, dispatch, reference
from tests.kernels.common import assert_close, make_ragged_case, numpy_flash, numpy_ragged

PACKAGE_DIR = pathlib.Path(pallas_kernels.__file__).parent


def test_imports_nothing_from_jserve():
    code = (
        "import sys, pallas_kernels, pallas_kernels.gpu, pallas_kernels.tpu\n"
        "bad = sorted(m for m in sys.modules if m == 'jserve' or m.startswith('jserve.'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE_DIR.parent)
    for path in PACKAGE_DIR.rglob("*.py"):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            assert not stripped.startswith(("import jserve", "from jserve")), f"{path}: {line}"


def test_backend_resolution(monkeypatch):
    with pytest.raises(ValueError):
        dispatch.resolve_backend("cuda")
    assert dispatch.resolve_backend("xla") == "xla"
    assert dispatch.resolve_backend("auto") == "xla"  # CPU
    monkeypatch.setattr(dispatch, "resolve_backend", lambda backend: "gpu")
    assert dispatch.pick_backend("auto", head_dim=128, page_size=16) == "gpu"
    assert dispatch.pick_backend("auto", head_dim=80, page_size=16) == "xla"  # not a multiple of 64: reference
    assert dispatch.pick_backend("auto", head_dim=128, page_size=4) == "xla"
    assert dispatch.pick_backend("auto", head_dim=128, page_size=24) == "xla"  # a 64-key step is not whole pages
    assert dispatch.pick_backend("auto", head_dim=64, page_size=128) == "gpu"
    assert dispatch.pick_backend("auto", head_dim=128, page_size=16, dtype=jnp.bfloat16) == "gpu"
    assert dispatch.pick_backend("auto", head_dim=128, page_size=16, dtype=jnp.float32) == "xla"  # bf16 matmuls
    assert dispatch.pick_backend("gpu", head_dim=80) == "gpu"  # forced: the kernel raises its own error


def test_reference_matches_float64():
    case = make_ragged_case([(4, 10), (1, 17), (0, 3)], group=4, page_size=8, int8=True, seed=11)
    ref = reference.ragged_paged_attention(*case.args, **case.scale_kwargs, sliding_window=6)
    assert_close(ref, numpy_ragged(case, sliding_window=6), 1e-4, "reference ragged vs float64")
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 9, 4, 64)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 9, 2, 64)), jnp.float32)
    seg = jnp.asarray([[0, 0, 1, 1, 1, 2, 2, 2, 2]] * 2, jnp.int32)
    kwargs = dict(causal=True, sliding_window=3, segment_ids=seg, logit_soft_cap=2.0)
    assert_close(
        reference.flash_attention(q, k, k, **kwargs),
        numpy_flash(q, k, k, **kwargs),
        1e-4,
        "reference flash vs float64",
    )


@pytest.mark.parametrize("backend", ["xla", "tpu", "gpu"])
def test_public_entry_points(backend):
    if backend == "gpu" and not compat.gpu_available():
        pytest.skip("no Mosaic GPU in this jaxlib")
    case = make_ragged_case([(3, 9), (1, 64)], group=4, page_size=16, dtype=jnp.bfloat16, seed=12)
    out = pallas_kernels.ragged_paged_attention(*case.args, backend=backend, interpret=True)
    assert_close(out, numpy_ragged(case), 3e-2, f"ragged {backend}")
    decode = make_ragged_case(
        [(1, 5), (1, 70)], group=4, page_size=16, dtype=jnp.bfloat16, extra_seqs=0, extra_tokens=0, seed=13
    )
    out = pallas_kernels.paged_attention(
        decode.q,
        decode.k_pages,
        decode.v_pages,
        decode.kv_lens,
        decode.block_tables,
        backend=backend,
        interpret=True,
    )
    assert_close(out, numpy_ragged(decode), 3e-2, f"paged {backend}")
