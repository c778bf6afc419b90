"""Layers run in a loop: each layer's params stacked on a leading axis, so a step program traces, lowers and
compiles one period of layers whatever the depth.

Layers whose graphs differ (Gemma 2/3's sliding-window and global layers, Qwen3-MoE's dense and sparse MLPs,
Gemma 3's two RoPEs) are grouped by their repeating pattern: the loop body runs one *period* of layers (one
layer for Llama, two for Gemma 2, six for Gemma 3) and each position in the period has its own stack. Layer i
of a stack starting at ``start`` sits at position ``(i - start) % period``, index ``(i - start) // period``.
A depth that is not a multiple of the period leaves a few layers at the end, run unrolled from the same stacks.

The KV cache needs no stacking of its own: it is already one buffer per stage with layer-major page ids
(``AttentionBackend.for_layer``), which the loop carries and updates in place.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import jax
import numpy as np
from flax import nnx


@dataclass(frozen=True)
class LayerStack:
    """Static description of layers [start, stop) stored as ``period`` stacks."""

    start: int
    stop: int
    period: int

    def members(self, position: int) -> range:
        """The layers stacked at ``position`` of the period, in stack order."""
        return range(self.start + position, self.stop, self.period)

    def locate(self, layer: int) -> tuple[int, int]:
        """(position in the period, index in that position's stack) of ``layer``."""
        return (layer - self.start) % self.period, (layer - self.start) // self.period


@dataclass(frozen=True)
class StackedLayers:
    """The stacked params: ``states[r]`` is the nnx state of the layers at period position r, each leaf with a
    leading [len(stack.members(r))] axis. ``stack`` travels as static pytree metadata."""

    states: tuple
    stack: LayerStack


jax.tree_util.register_dataclass(StackedLayers, data_fields=["states"], meta_fields=["stack"])


def find_period(signatures: Sequence[Hashable]) -> int:
    """The smallest p such that layer i looks like layer i % p for every i (p = len when nothing repeats)."""
    n = len(signatures)
    for p in range(1, n + 1):
        if all(signatures[i] == signatures[i % p] for i in range(n)):
            return p
    return max(n, 1)


def plan_stack(model, layers: range) -> LayerStack:
    """The stack of ``layers``: layers look alike when their graphs (static attributes such as the sliding
    window, the MLP kind) and their RoPE are the same."""
    cfg = model.config
    signatures = [(nnx.graphdef(model.layers[i]), cfg.layer_rope(i)) for i in layers]
    return LayerStack(layers.start, layers.stop, find_period(signatures))


def stack_states(layer_state: Callable[[int], nnx.State], stack: LayerStack) -> tuple:
    """Per period position, its layers' states stacked on a new leading axis (numpy, on the host)."""
    return tuple(
        jax.tree.map(lambda *leaves: np.stack([np.asarray(a) for a in leaves]), *[layer_state(i) for i in members])
        for members in (stack.members(r) for r in range(stack.period))
    )


def run_stacked(graphdefs: Sequence, stacked: StackedLayers, layers: range, carry, run_layer: Callable):
    """Runs ``layers`` (a range inside the stack): whole periods in one ``fori_loop``, any layers before the first
    whole period or after the last one unrolled. ``run_layer(module, layer, like, carry) -> carry``: ``layer``
    is the layer's index (traced inside the loop), ``like`` a static index of a layer that looks the same.
    ``graphdefs[r]``: the graph of the layers at period position r."""
    stack, period = stacked.stack, stacked.stack.period

    def module(position: int, index):
        return nnx.merge(graphdefs[position], jax.tree.map(lambda a: a[index], stacked.states[position]))

    def unrolled(layer: int, carry):
        position, index = stack.locate(layer)
        return run_layer(module(position, index), layer, layer, carry)

    first = -(-(layers.start - stack.start) // period)  # the first whole period in ``layers``
    last = (layers.stop - stack.start) // period  # one past the last
    if last <= first:
        for layer in layers:
            carry = unrolled(layer, carry)
        return carry
    for layer in range(layers.start, stack.start + first * period):
        carry = unrolled(layer, carry)

    def body(index, carry):
        for position in range(period):
            like = stack.start + position
            carry = run_layer(module(position, index), like + index * period, like, carry)
        return carry

    carry = jax.lax.fori_loop(first, last, body, carry)
    for layer in range(stack.start + last * period, layers.stop):
        carry = unrolled(layer, carry)
    return carry
