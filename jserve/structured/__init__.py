"""Structured outputs: grammars (JSON schema, regex, choice, Lark) compiled by llguidance into per-step token
bitmasks that the sampler applies on the device.

- ``vocab``: the llguidance tokenizer of a checkpoint's tokenizer.
- ``grammar``: a ``StructuredOutputsParams`` -> llguidance grammar text.
- ``compiler``: compiles off the engine thread (a small pool), caches by specification, bounds the wait.
- ``matcher``: one sequence's grammar state: its bitmask rows, the tokens it accepts, draft validation.

Host only (numpy + llguidance); nothing here imports jax.
"""

from jserve.structured.compiler import CompiledGrammar, GrammarCompiler
from jserve.structured.matcher import GrammarState, fill_bitmask_rows

__all__ = ["CompiledGrammar", "GrammarCompiler", "GrammarState", "fill_bitmask_rows"]
