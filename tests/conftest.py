"""Test-wide setup: 8 fake CPU devices, a persistent compilation cache, float32 matmuls, shared fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Token buckets from 8, as on GPU / TPU: the CPU default (1, 2, 4, 8, ...) is three more programs per engine to
# compile on a 2-core machine. Tests of the CPU default pass min_token_bucket=1 (test_fixed_programs,
# test_batch_invariance).
os.environ.setdefault("JSERVE_MIN_TOKEN_BUCKET", "8")

import jax  # noqa: E402
import pytest  # noqa: E402

_CACHE_DIR = os.environ.get("JSERVE_TEST_JAX_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", os.path.abspath(_CACHE_DIR))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory):
    """A sentencepiece tokenizer trained on the corpus the repository ships."""
    from tests.tokenizer_utils import train_sentencepiece

    return train_sentencepiece(tmp_path_factory.mktemp("sp"), vocab_size=512)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, sp_model):
    """A tiny random Llama (GQA) with a trained sentencepiece tokenizer; weights scaled up so that greedy
    choices are decisive (no near-ties that float reassociation could flip)."""
    from tests.checkpoints import make_checkpoint
    from tests.tokenizer_utils import write_hf_tokenizer_files

    path, _ = make_checkpoint("llama-gqa", tmp_path_factory.mktemp("tiny") / "llama", initializer_range=0.1)
    write_hf_tokenizer_files(path, sp_model)
    return path


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each module, drop jax's in-memory caches of compiled programs. XLA:CPU maps every kernel of a
    program separately, and a worker that ran the kernel suites held ~23,000 maps of programs no later test
    calls (hypothesis draws a new shape each example); with the engines of a later module on top, a CI worker
    reached 43,000 of the 65,530 that ``vm.max_map_count`` allows (jserve/memory_maps.py refuses past it).
    Programs a later module needs again come back from the persistent compilation cache."""
    yield
    jax.clear_caches()
