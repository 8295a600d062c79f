"""Token compaction: run the token-wise layers on a batch's real tokens only.

A right-padded DPO batch of length-bucketed rows is ~10-15% padding. Everything in a decoder layer
except attention's score/value products works token by token (norms, the q/k/v/o projections,
RoPE, the MLP), so it can run on the kept tokens alone, packed as `[G, N, ...]`, and only
attention sees the padded `[B, T, ...]` layout. The rows are cut into G groups (one per batch
shard, so compaction never moves a token across devices); a group's N kept slots are its real
tokens plus, to fill a static N, some of its padding positions. The host builds the two index
arrays (`alignx_jax.data.batching.compact_index`):

* `token_index [G, N]`: slot -> position in the group's flattened rows;
* `token_slot [G, R]`: position -> slot, or N for a position that was not kept (reads as zero).

Each map is a bijection between the kept positions and the slots, so `compact` and `expand` are
each other's transpose and both directions, forward and backward, are gathers (XLA's scatter-add,
the autodiff transpose of a gather, is a serial loop on CPU).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class TokenLayout(NamedTuple):
    """The kept tokens of a `[B, T]` batch, in G groups of N slots (see the module docstring)."""

    index_GN: jax.Array
    slot_GR: jax.Array

    @property
    def groups(self) -> int:
        return int(self.index_GN.shape[0])

    def tokens(self, x_BT: jax.Array) -> jax.Array:
        """`[B, T, ...]` -> the kept tokens `[G, N, ...]`."""
        B, T = x_BT.shape[:2]
        x_GR = x_BT.reshape(self.groups, B * T // self.groups, *x_BT.shape[2:])
        if not jnp.issubdtype(x_BT.dtype, jnp.floating):  # ids, positions: nothing to differentiate
            return _take(x_GR, self.index_GN)
        return compact(x_GR, self.index_GN, self.slot_GR)

    def rows(self, x_GN: jax.Array, B: int, T: int) -> jax.Array:
        """The kept tokens `[G, N, ...]` -> `[B, T, ...]`, zero where a position was not kept."""
        return expand(x_GN, self.index_GN, self.slot_GR).reshape(B, T, *x_GN.shape[2:])


def _take(x_GR, idx_GN, fill: bool = False):
    """`x[g, idx[g, n]]` per group; with `fill`, an index past the end reads zero."""
    mode = "fill" if fill else "promise_in_bounds"
    return jax.vmap(lambda x, i: x.at[i].get(mode=mode, fill_value=0))(x_GR, idx_GN)


@jax.custom_vjp
def compact(x_GR: jax.Array, index_GN: jax.Array, slot_GR: jax.Array) -> jax.Array:
    """The kept tokens `[G, N, ...]` of the group-flattened rows `x [G, R, ...]`."""
    return _take(x_GR, index_GN)


def _compact_fwd(x_GR, index_GN, slot_GR):
    return _take(x_GR, index_GN), (index_GN, slot_GR)


def _compact_bwd(res, g_GN):
    index_GN, slot_GR = res
    return _take(g_GN, slot_GR, fill=True), None, None


compact.defvjp(_compact_fwd, _compact_bwd)


@jax.custom_vjp
def expand(x_GN: jax.Array, index_GN: jax.Array, slot_GR: jax.Array) -> jax.Array:
    """The group-flattened rows `[G, R, ...]` holding the kept tokens `x [G, N, ...]`, zeros elsewhere."""
    return _take(x_GN, slot_GR, fill=True)


def _expand_fwd(x_GN, index_GN, slot_GR):
    return _take(x_GN, slot_GR, fill=True), (index_GN, slot_GR)


def _expand_bwd(res, g_GR):
    index_GN, slot_GR = res
    return _take(g_GR, index_GN), None, None


expand.defvjp(_expand_fwd, _expand_bwd)
