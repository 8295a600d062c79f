"""`dense`: the 2-D matmul every projection and the output layer use, with a weight gradient
laid out for the CPU backend.

Autodiff writes a linear layer's weight gradient as `dot(x, dy)` contracting the token axis of both
operands. On XLA's CPU backend that dot cannot go to the YNNPACK kernels (they want the lhs
contraction axis minor) and runs on Eigen, far slower than the same product with `x` transposed
first (BENCHMARKS.md §1). The custom VJP
materialises `x^T` (the smaller operand: tokens x d_in) behind an optimization barrier, which keeps
the algebraic simplifier from folding the transpose back into the dot. Values are unchanged; on
GPU and TPU the plain autodiff rule is used.

Low-precision products on CPU accumulate into a float32 result that is then rounded: XLA's CPU
backend runs a bf16 x bf16 -> bf16 dot as a float32 dot of upcast copies, while bf16 inputs with a
float32 result reach the bf16 (AMX/AVX-512-BF16) kernels. The values are the same either way.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from alignx_jax.sharding import active_mesh, target_platform


def transposed_wgrad() -> bool:
    """Whether `dense` takes the CPU weight-gradient rule (`x^T` written out, float32 residuals): on a
    CPU only, since on a GPU those copies cost memory a large step cannot spare (BENCHMARKS.md §8)."""
    return target_platform() == "cpu"


def dense(x_NI: jax.Array, w_IO: jax.Array, out_dtype=None) -> jax.Array:
    """`x @ w` for `x [N, I]`, `w [I, O]` (result in `out_dtype`, default x's dtype, accumulated
    in it as `preferred_element_type`). A wider `w` (float32 parameters of a bf16 model) is cast to
    x's dtype for the product; its gradient comes back in w's dtype."""
    return dense_many(x_NI, (w_IO,), out_dtype)[0]


def dense_many(x_NI: jax.Array, ws_IO: tuple[jax.Array, ...], out_dtype=None) -> tuple[jax.Array, ...]:
    """`tuple(x @ w for w in ws)`: several projections of one input (q/k/v, gate/up) that share one
    `x^T` in the backward pass on CPU. The kernels stay separate arrays (their shardings too)."""
    ws_IO, out_dtype = tuple(ws_IO), jnp.dtype(out_dtype or x_NI.dtype)
    if not transposed_wgrad():
        return _products(x_NI, _cast(ws_IO, x_NI.dtype), out_dtype)
    return _dense_many(x_NI, ws_IO, out_dtype, jnp.dtype(x_NI.dtype))


def _cast(ws, dtype) -> tuple[jax.Array, ...]:
    return tuple(w.astype(dtype) for w in ws)


def _low_precision(dtype) -> bool:
    return jnp.finfo(dtype).bits < 32


def _products(x_NI, ws_IO, out_dtype):
    return tuple(jnp.dot(x_NI, w, preferred_element_type=out_dtype) for w in ws_IO)


def _products_f32(x_NI, ws_IO, out_dtype):
    # CPU: a float32 result keeps bf16 inputs on the fast kernels (module docstring)
    acc = jnp.float32 if _low_precision(out_dtype) else out_dtype
    return tuple(jnp.dot(x_NI, w, preferred_element_type=acc).astype(out_dtype) for w in ws_IO)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dense_many(x_NI, ws_IO, out_dtype, dtype):
    return _products_f32(x_NI, _cast(ws_IO, dtype), out_dtype)


def _dense_many_fwd(x_NI, ws_IO, out_dtype, dtype):
    # The residuals are float32 and the kernels uncast: under a layer scan each residual becomes a
    # [L, ...] stack, and XLA's CPU backend updates a bf16 stack by converting all of it to float32
    # and back for every layer (a cost growing as L^2); a float32 stack is updated in place.
    x_res = x_NI.astype(jnp.float32) if _low_precision(dtype) else x_NI
    return _products_f32(x_NI, _cast(ws_IO, dtype), out_dtype), (x_res, ws_IO)


def _transposed(a_MN: jax.Array, row_major: bool) -> jax.Array:
    """`a.T` behind a barrier; `row_major`: written out row-major through a flat copy. A bare transpose
    behind the barrier can still become a layout change of the same buffer, which the bf16 dot kernels
    do not take (they fall back to float32). The flat copy loses a sharded axis, so it is only used
    on one device (across devices XLA would gather the whole operand, as `alignx plan` of an FSDP step shows)."""
    if not row_major:
        return jax.lax.optimization_barrier(a_MN.T)
    m, n = a_MN.shape
    return jax.lax.optimization_barrier(a_MN.T.reshape(m * n)).reshape(n, m)


def _one_device() -> bool:
    mesh = active_mesh()
    return mesh is None or mesh.devices.size == 1


def _dense_many_bwd(out_dtype, dtype, res, dys_NO):
    x_NI, ws_IO = res[0].astype(dtype), res[1]
    dys_NO = [dy.astype(dtype) for dy in dys_NO]
    # bf16 on one device: x^T and w^T written out row-major for the bf16 kernels (w^T: a small copy)
    row_major = _low_precision(dtype) and _one_device()
    wts_OI = [_transposed(w, True) if row_major else w.T for w in _cast(ws_IO, dtype)]
    dx_NI = sum(jnp.dot(dy, wt, preferred_element_type=jnp.float32) for dy, wt in zip(dys_NO, wts_OI))
    # x^T materialised once, so every weight-gradient dot is a plain [I, N] x [N, O] product
    xt_IN = _transposed(x_NI, row_major)
    dws_IO = tuple(
        jnp.dot(xt_IN, dy, preferred_element_type=jnp.float32).astype(w.dtype) for dy, w in zip(dys_NO, ws_IO)
    )
    return dx_NI.astype(dtype), dws_IO


_dense_many.defvjp(_dense_many_fwd, _dense_many_bwd)
