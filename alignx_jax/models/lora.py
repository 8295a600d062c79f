"""LoRA adapters for the decoder's projections (`model.lora.*`).

A targeted kernel `W` (stacked `[L, *in, *out]`) gets two `nnx.LoRAParam`s: `lora_a [L, *in, r]`
(random, PEFT's kaiming-uniform bound 1/sqrt(fan_in)) and `lora_b [L, r, *out]` (zeros), so a new
adapter leaves the model unchanged. `A`'s input axes and `B`'s output axes carry the kernel's
logical names (they shard like it); the rank axis has none (replicated). The layer computes
`x @ W + s * (x @ A) @ B` with `s = (alpha / r) * Decoder.lora_scale`: the low-rank path costs
2 N r (I + O) flops and its gradients are small, where merging `W + s A @ B` in the forward would
materialise an `[I, O]` kernel per layer and, worse, an `[I, O]` weight gradient (N I O flops) for
`A` and `B` to be read from. `Decoder.lora_scale = 0.0` (`adapters_off`) drops the adapters from
the forward: the same module computes the base model (DPO's reference), no second weight copy.

Trained params are the LoRA leaves only (`split` / `join` between the full pure dict and its
trainable and frozen parts); `merged_params` folds the adapters into the kernels for export.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignx_jax.errors import ConfigError
from alignx_jax.sharding import annotated, variable_axes

# the decoder's projection names (models.weights.Attention / MLP) LoRA can adapt
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_KEYS = ("lora_a", "lora_b")
ATTENTION_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
# input axes of each projection's kernel after the leading layers axis (the rest are outputs)
KERNEL_INPUTS = {
    "q_proj": 1,
    "k_proj": 1,
    "v_proj": 1,
    "o_proj": 2,
    "gate_proj": 1,
    "up_proj": 1,
    "down_proj": 1,
}


def check_options(rank: int, alpha: float, targets: tuple[str, ...]) -> None:
    """One-line ConfigErrors for `model.lora.*`."""
    if int(rank) != rank or rank < 0:
        raise ConfigError(f"model.lora.rank={rank} must be a non-negative integer (0 = LoRA off)")
    if not 0 <= alpha < math.inf:  # `not <=`: a NaN alpha scaled every adapter to NaN
        raise ConfigError(f"model.lora.alpha={alpha} must be >= 0 and finite (0 = 2 * rank)")
    bad = [t for t in targets if t not in LORA_TARGETS]
    if bad:
        raise ConfigError(
            f"model.lora.targets: unknown projection {bad[0]!r} (known: {', '.join(LORA_TARGETS)})"
        )
    if rank and not targets:
        raise ConfigError("model.lora.targets is empty with model.lora.rank > 0")


def multiplier(rank: int, alpha: float) -> float:
    """`alpha / rank` (alpha 0 -> 2 * rank, i.e. 2.0); 0.0 with LoRA off."""
    if not rank:
        return 0.0
    return float(alpha or 2 * rank) / float(rank)


def _uniform(key: jax.Array, shape, bound: float) -> jax.Array:
    if isinstance(key, jax.core.Tracer):
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound)
    seed = np.asarray(jax.random.key_data(key)).astype(np.uint64).tolist()  # eager: no compile per shape
    return jnp.asarray(np.random.default_rng(seed).uniform(-bound, bound, shape).astype(np.float32))


def adapters(rngs: nnx.Rngs, kernel_shape, kernel_axes, n_in: int, rank: int) -> tuple[nnx.LoRAParam, ...]:
    """(lora_a, lora_b) float32 LoRAParams for a stacked kernel `[L, *in, *out]` with `n_in` input axes."""
    lead, ins, outs = kernel_shape[:1], tuple(kernel_shape[1 : 1 + n_in]), tuple(kernel_shape[1 + n_in :])
    a_axes = (kernel_axes[0], *kernel_axes[1 : 1 + n_in], None)
    b_axes = (kernel_axes[0], None, *kernel_axes[1 + n_in :])
    a = _uniform(rngs.params(), (*lead, *ins, rank), 1.0 / math.sqrt(math.prod(ins)))
    b = jnp.zeros((*lead, rank, *outs), jnp.float32)
    return (
        annotated(nnx.LoRAParam, a, a_axes),
        annotated(nnx.LoRAParam, b, b_axes),
    )


def _targeted(layers: nnx.Module, cfg):
    """(key index, projection name, its group 'attn'|'mlp', the projection module) per model.lora target."""
    for i, name in enumerate(LORA_TARGETS):
        if name in cfg.lora_targets:
            group = "attn" if name in ATTENTION_PROJS else "mlp"
            yield i, name, group, getattr(getattr(layers, group), name)


def _draw(proj: nnx.Module, name: str, cfg, key: jax.Array, i: int) -> tuple[nnx.LoRAParam, nnx.LoRAParam]:
    kernel = proj.kernel
    rngs = nnx.Rngs(params=jax.random.fold_in(key, i))
    return adapters(rngs, kernel.get_value().shape, variable_axes(kernel), KERNEL_INPUTS[name], cfg.lora_rank)


def add_adapters(layers: nnx.Module, cfg, key: jax.Array) -> None:
    """Give each targeted projection of `DecoderLayers` its (lora_a, lora_b)."""
    for i, name, _, proj in _targeted(layers, cfg):
        proj.lora_a, proj.lora_b = _draw(proj, name, cfg, key, i)


def new_adapters(layers: nnx.Module, cfg, key: jax.Array) -> dict[tuple[str, ...], np.ndarray]:
    """Host values of new adapters, by state path (`("layers", "attn", "q_proj", "lora_a")`), for a
    decoder whose base weights come from files that hold none (an HF folder, a plain model checkpoint):
    drawn as `add_adapters` draws them (A random, B zeros), so the loaded model still computes its base.
    `layers` may be abstract (`nnx.eval_shape`): only the kernels' shapes and logical axes are read."""
    out = {}
    for i, name, group, proj in _targeted(layers, cfg):
        a, b = _draw(proj, name, cfg, key, i)
        out[("layers", group, name, "lora_a")] = np.asarray(a.get_value())
        out[("layers", group, name, "lora_b")] = np.asarray(b.get_value())
    return out


def _key(k) -> Any:
    return getattr(k, "key", getattr(k, "name", k))


def _is_lora(path) -> bool:
    return bool(path) and _key(path[-1]) in LORA_KEYS


def _filter(tree: Any, keep) -> Any:
    """The nested dict `tree` with only the leaves whose key path `keep(path)` accepts (empty dicts dropped)."""

    def go(node, path):
        if not isinstance(node, dict):
            return node if keep(path) else None
        out = {}
        for k, v in node.items():
            sub = go(v, (*path, k))
            if sub is not None and not (isinstance(sub, dict) and not sub):
                out[k] = sub
        return out

    return go(tree, ())


def split(params: dict) -> tuple[dict, dict]:
    """A full pure params dict -> (LoRA leaves, the rest), both nested like it."""
    lora = _filter(params, lambda p: bool(p) and p[-1] in LORA_KEYS)
    base = _filter(params, lambda p: not (p and p[-1] in LORA_KEYS))
    return lora, base


def join(lora: dict, base: dict) -> dict:
    """`split`'s inverse: the nested union of two disjoint dicts."""
    if not isinstance(lora, dict) or not isinstance(base, dict):
        raise ValueError("lora.join: overlapping leaves")
    out = dict(base)
    for k, v in lora.items():
        out[k] = join(v, out[k]) if k in out else v
    return out


def strip(params: dict) -> dict:
    """`params` without its LoRA leaves (adapters off)."""
    return split(params)[1]


def delta(a: jax.Array, b: jax.Array, n_in: int, scale: float) -> jax.Array:
    """`scale * A @ B` shaped like the kernel `[L, *in, *out]`, in float32."""
    L, r = a.shape[0], a.shape[-1]
    ins, outs = a.shape[1:-1], b.shape[2:]
    assert len(ins) == n_in
    a2 = jnp.asarray(a, jnp.float32).reshape(L, math.prod(ins), r)
    b2 = jnp.asarray(b, jnp.float32).reshape(L, r, math.prod(outs))
    return (scale * jnp.einsum("lir,lro->lio", a2, b2)).reshape(L, *ins, *outs)


def merged_params(params: dict, scale: float, dtype: Any = None) -> dict:
    """The pure params dict with each adapter folded into its kernel, `W + scale * A @ B` (computed
    in float32, stored in `dtype`, default W's), and no LoRA leaves: the plain decoder's params."""

    def go(node):
        if not isinstance(node, dict):
            return node
        out = {k: go(v) for k, v in node.items() if k not in LORA_KEYS}
        if "lora_a" in node:
            w = node["kernel"]
            d = delta(node["lora_a"], node["lora_b"], w.ndim - node["lora_b"].ndim + 1, scale)
            out["kernel"] = (jnp.asarray(w, jnp.float32) + d).astype(dtype or w.dtype)
        return out

    return go(params)


def merged(model, dtype: Any = None):
    """A plain Decoder (LoRA off) whose kernels hold the model's adapters folded in (export), stored in
    `dtype` (default the base's: a wider one keeps updates under the base's rounding step)."""
    from alignx_jax.models.decoder import Decoder

    cfg = model.cfg
    if not cfg.lora_rank:
        return model
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    base_cfg = cfg.replace(lora_rank=0)
    abstract = nnx.eval_shape(lambda: Decoder(base_cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(abstract)
    nnx.replace_by_pure_dict(state, merged_params(params, cfg.lora_multiplier * model.lora_scale, dtype))
    return nnx.merge(nnx.graphdef(abstract), state)


def adapters_off(model):
    """`model` computing the base model (its adapters skipped); returns it."""
    model.lora_scale = 0.0
    return model


def infer_options(tree: Any) -> dict[str, Any] | None:
    """{lora_rank, lora_targets} of a stored params tree with LoRA leaves (None without)."""
    rank, targets = None, set()
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        keys = [_key(k) for k in path]
        if keys and keys[-1] == "lora_a":
            rank = int(leaf.shape[-1])
            targets.add(keys[-2])
    if rank is None:
        return None
    return {"lora_rank": rank, "lora_targets": tuple(t for t in LORA_TARGETS if t in targets)}


def with_new_adapters(plain, options: dict[str, Any], seed: int):
    """The plain Decoder `plain` (no adapters) with `options`' (lora_rank, lora_alpha, lora_targets) new
    adapters drawn from `seed` as a load of base-only files draws them (`new_adapters`): it computes `plain`.
    The arrays are unplaced: the caller shards the model."""
    from alignx_jax.models.decoder import Decoder

    cfg = plain.cfg.replace(**options)
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    pure = nnx.to_pure_dict(nnx.state(plain))
    for path, host in new_adapters(abstract.layers, cfg, jax.random.key(seed)).items():
        node = pure
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = jnp.asarray(host)
    state = nnx.state(abstract)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(nnx.graphdef(abstract), state)
