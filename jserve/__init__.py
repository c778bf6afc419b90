"""jserve: a JAX/XLA inference runtime for large language models."""

from jserve.api import LLM
from jserve.engine.async_llm import AsyncLLM
from jserve.outputs import CompletionOutput, RequestOutput
from jserve.sampling_params import SamplingParams

__all__ = ["LLM", "AsyncLLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
