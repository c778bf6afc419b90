"""jserve: a JAX/XLA inference runtime for large language models.

``LLM`` and ``AsyncLLM`` import jax, so they load on first use: the engine's host modules (request, kv_cache,
scheduler) and the server's validation stay importable without jax.
"""

from jserve.bundled import BUNDLED_DRAFT_MODEL, BUNDLED_MODEL
from jserve.lora.request import LoRARequest
from jserve.outputs import CompletionOutput, RequestOutput
from jserve.sampling_params import SamplingParams, StructuredOutputsParams

__all__ = [
    "BUNDLED_DRAFT_MODEL",
    "BUNDLED_MODEL",
    "LLM",
    "AsyncLLM",
    "CompletionOutput",
    "LoRARequest",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutputsParams",
]


def __getattr__(name: str):
    if name == "LLM":
        from jserve.api import LLM

        return LLM
    if name == "AsyncLLM":
        from jserve.engine.async_llm import AsyncLLM

        return AsyncLLM
    raise AttributeError(f"module 'jserve' has no attribute {name!r}")
