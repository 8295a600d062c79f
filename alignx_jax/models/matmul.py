"""`dense`: the 2-D matmul every projection and the output layer use, with a weight gradient
laid out for the CPU backend.

Autodiff writes a linear layer's weight gradient as `dot(x, dy)` contracting the token axis of both
operands. On XLA's CPU backend that dot cannot go to the YNNPACK kernels (they want the lhs
contraction axis minor) and runs on Eigen at about 70 GFLOP/s for an output layer's shape, against
160 for the same product with `x` transposed first (`benchmarks/BENCHMARKS.md`, §1). The custom VJP
materialises `x^T` (the smaller operand: tokens x d_in) behind an optimization barrier, which keeps
the algebraic simplifier from folding the transpose back into the dot. Values are unchanged; on
GPU and TPU the plain autodiff rule is used.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def _transposed_wgrad() -> bool:
    return jax.default_backend() == "cpu"


def dense(x_NI: jax.Array, w_IO: jax.Array, out_dtype=None) -> jax.Array:
    """`x @ w` for `x [N, I]`, `w [I, O]` (result in `out_dtype`, default x's dtype, accumulated
    in it as `preferred_element_type`)."""
    out_dtype = jnp.dtype(out_dtype or x_NI.dtype)
    if not _transposed_wgrad():
        return jnp.dot(x_NI, w_IO, preferred_element_type=out_dtype)
    return _dense(x_NI, w_IO, out_dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense(x_NI, w_IO, out_dtype):
    return jnp.dot(x_NI, w_IO, preferred_element_type=out_dtype)


def _dense_fwd(x_NI, w_IO, out_dtype):
    return _dense(x_NI, w_IO, out_dtype), (x_NI, w_IO)


def _dense_bwd(out_dtype, res, dy_NO):
    x_NI, w_IO = res
    dy_NO = dy_NO.astype(x_NI.dtype)
    dx_NI = jnp.dot(dy_NO, w_IO.T, preferred_element_type=jnp.float32).astype(x_NI.dtype)
    # x^T materialised, so the weight-gradient dot is a plain [I, N] x [N, O] product
    xt_IN = jax.lax.optimization_barrier(x_NI.T)
    dw_IO = jnp.dot(xt_IN, dy_NO, preferred_element_type=jnp.float32).astype(w_IO.dtype)
    return dx_NI, dw_IO


_dense.defvjp(_dense_fwd, _dense_bwd)
