"""The train state: the policy (and joint PBA head) built from a config, the pure-dict codecs the
step trains through, the optimizers, and the mesh rules and placements of what is trained.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from alignx_jax import sharding as shd
from alignx_jax.errors import CheckpointError, ConfigError
from alignx_jax.hardware import resolve_dtype
from alignx_jax.models.config import ARCHITECTURE_KEYS
from alignx_jax.models.preference_head import head_params
from alignx_jax.models.presets import resolve_model_path


def rules_from_config(cfg: ml_collections.ConfigDict) -> shd.Rules:
    return tuple(
        (str(name), None if axes is None else (axes if isinstance(axes, str) else tuple(axes)))
        for name, axes in cfg.sharding.rules
    )


def run_options(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The DecoderConfig options a run sets from `model.*` (remat, scan, attention, CPU matmuls, frozen
    layers)."""
    return {
        "remat": str(cfg.model.remat),
        "scan_layers": bool(cfg.model.scan_layers),
        "attention_impl": str(cfg.model.attention_impl),
        "cpu_matmul": str(cfg.model.cpu_matmul),
        "frozen_layers": int(cfg.model.frozen_layers),
        **lora_options(cfg),
    }


def lora_options(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The DecoderConfig LoRA fields from `model.lora` (none at rank 0)."""
    from alignx_jax.models import lora

    sec = cfg.model.lora
    targets = (sec.targets,) if isinstance(sec.targets, str) else tuple(str(t) for t in sec.targets)
    rank, alpha = sec.rank, float(sec.alpha)
    lora.check_options(rank, alpha, targets)
    if not rank:
        return {}
    return {"lora_rank": int(rank), "lora_alpha": alpha, "lora_targets": targets}


def tree_shardings(tree: Any, mesh) -> Any:
    """Each leaf's NamedSharding (replicated where it has none): the step's out_shardings."""
    rep = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else rep, tree)


def load_tokenizer_for(cfg: ml_collections.ConfigDict):
    """(tokenizer, folder holding its files or None for the shipped one)."""
    from alignx_jax.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer

    key = "model.tokenizer" if cfg.model.tokenizer else "model.hf_path"
    path = resolve_model_path(cfg.model.tokenizer or cfg.model.hf_path) or None
    if path is not None and not os.path.isdir(path):  # name the key the user set
        raise CheckpointError(f"{key}: folder not found: {path}")
    tok = load_tokenizer(path)
    return tok, (path or TINY_TOKENIZER_DIR)


def init_hf_config(init: ml_collections.ConfigDict, vocab_size: int) -> dict:
    """The HF config.json dict of a `model.init` section (a randomly initialised decoder)."""
    hf_cfg = {k: init[k] for k in ARCHITECTURE_KEYS}  # `model.init` spells them as config.json does
    hf_cfg["vocab_size"] = vocab_size
    return hf_cfg


def build_policy(cfg: ml_collections.ConfigDict, tokenizer, mesh, rules):
    """The policy Decoder with float32 (param_dtype) master weights placed on the mesh."""
    from alignx_jax.models import checkpoint, hf
    from alignx_jax.models.decoder import Decoder, DecoderConfig

    opts = run_options(cfg)
    dtype = resolve_dtype(str(cfg.model.dtype))  # `auto`: this machine's (alignx_jax.hardware)
    if cfg.model.hf_path:
        path = resolve_model_path(cfg.model.hf_path, model=True)
        # the files hold the base model: model.lora's new adapters are drawn from model.init.seed
        loaded = {**opts, "adapter_seed": int(cfg.model.init.seed)}
        if checkpoint.is_checkpoint_layout(path):
            if checkpoint.has_lora_adapters(checkpoint.resolve_checkpoint(path)):
                return _from_lora_checkpoint(path, cfg, dtype, mesh, rules, loaded)
            return checkpoint.load_checkpoint(
                path,
                dtype=cfg.model.param_dtype,
                mesh=mesh,
                rules=rules,
                compute_dtype=dtype,
                **loaded,
            )
        return hf.load_pretrained(path, cfg.model.param_dtype, mesh, rules, compute_dtype=dtype, **loaded)
    init = cfg.model.init
    if init.vocab_size != -1 and int(init.vocab_size) < len(tokenizer):  # past the table: NaN embeddings
        raise ConfigError(
            f"model.init.vocab_size={init.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens; "
            "use -1 (the tokenizer's) or at least that"
        )
    hf_cfg = init_hf_config(init, len(tokenizer) if init.vocab_size == -1 else int(init.vocab_size))
    hf_cfg.update(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    dcfg = DecoderConfig.from_hf(hf_cfg, dtype=dtype, param_dtype=cfg.model.param_dtype, **opts)
    model = Decoder(dcfg, rngs=nnx.Rngs(int(init.seed)))
    return shd.shard_model(model, mesh, rules)


def _from_lora_checkpoint(path: str, cfg: ml_collections.ConfigDict, dtype: str, mesh, rules, loaded: dict):
    """A LoRA run's workdir as `model.hf_path`: the model it trained (its adapters folded into the kernels)
    is the start, and the reference, as W/reference records it; this run's model.lora adapters are new."""
    from alignx_jax.models import checkpoint, lora

    stored_opts = {k: v for k, v in loaded.items() if not k.startswith("lora_") and k != "adapter_seed"}
    stored = checkpoint.load_checkpoint(
        path, dtype=cfg.model.param_dtype, mesh=mesh, rules=rules, compute_dtype=dtype, **stored_opts
    )
    plain = lora.merged(stored)
    del stored
    new_opts = {k: v for k, v in loaded.items() if k.startswith("lora_")}
    if new_opts:
        plain = lora.with_new_adapters(plain, new_opts, loaded["adapter_seed"])
    return shd.shard_model(plain, mesh, rules)


def past_context(cfg: ml_collections.ConfigDict, model_cfg: Any) -> str | None:
    """A warning when the run's rows can reach positions the model was not built for (`data.max_length`
    over its `max_position_embeddings`), else None: RoPE computes any position, so nothing else says so."""
    longest, context = int(cfg.data.max_length), int(model_cfg.max_position_embeddings)
    if longest <= context:
        return None
    return (
        f"data.max_length={longest} exceeds the model's max_position_embeddings={context}: rows that long "
        "use positions it was not trained at"
    )


@dataclasses.dataclass(frozen=True)
class ParamsCodec:
    """Pure-dict params (what we train, checkpoint and export) <-> the Decoder module."""

    graphdef: Any
    treedef: Any
    # the model's XLA compile options (`DecoderConfig.compiler_options`), as sorted (name, value) pairs
    options: tuple[tuple[str, Any], ...] = ()
    frozen_layers: int = 0  # the model's `frozen_layers`: the train step's reference shares those blocks

    @classmethod
    def of(cls, model) -> ParamsCodec:
        graphdef, state = nnx.split(model)
        pure = nnx.to_pure_dict(state)

        # leaves of the State and of its pure dict must line up one to one (both sort dict keys)
        def names(tree):
            return [
                tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
                for path, _ in jax.tree_util.tree_leaves_with_path(tree)
            ]

        if names(state) != names(pure):
            raise RuntimeError("decoder state and its pure dict disagree on leaf order")
        return cls(
            graphdef, jax.tree.structure(state), model.cfg.compiler_options_key(), model.cfg.frozen_layers
        )

    @property
    def compiler_options(self) -> dict[str, Any] | None:
        """What every program of the model is jitted with (`jax.jit(..., compiler_options=)`)."""
        return dict(self.options) or None

    def module(self, params: Any):
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, jax.tree.leaves(params)))

    # what the train step calls: the trained `params` and the frozen `ref_params` (full fine-tuning:
    # the whole policy and the reference copy; LoRA: the adapters and the base, `LoraCodec`)
    lora = False

    def policy(self, params: Any, ref_params: Any = None):
        """The policy Decoder from the trained params."""
        return self.module(params)

    def reference(self, ref_params: Any, params: Any = None):
        """The reference Decoder."""
        return self.module(ref_params)


@dataclasses.dataclass(frozen=True)
class LoraCodec(ParamsCodec):
    """model.lora: the trained params are the adapters (`models.lora.split`), `ref_params` the frozen
    base weights (in param_dtype); the reference is the same merged module with its adapters off."""

    adapters: Any = None  # ShapeDtypeStructs of the LoRA leaves (the reference pass needs no values)

    lora = True

    @classmethod
    def of(cls, model) -> LoraCodec:
        from alignx_jax.models import lora

        plain = ParamsCodec.of(model)
        shapes = lora.split(nnx.to_pure_dict(nnx.state(model)))[0]
        return cls(
            plain.graphdef,
            plain.treedef,
            plain.options,
            plain.frozen_layers,
            adapters=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), shapes),
        )

    @staticmethod
    def split(params: Any) -> tuple[Any, Any]:
        """Full pure params -> (adapters: trained, base: frozen)."""
        from alignx_jax.models import lora

        return lora.split(params)

    def policy(self, params: Any, ref_params: Any = None):
        from alignx_jax.models import lora

        return self.module(lora.join(params, ref_params))

    def reference(self, ref_params: Any, params: Any = None):
        from alignx_jax.models import lora

        if params is None:  # placeholders: the adapters are skipped with lora_scale 0 (dead code)
            params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), self.adapters)
        return lora.adapters_off(self.module(lora.join(params, ref_params)))


@dataclasses.dataclass(frozen=True)
class HeadCodec:
    """Pure-dict params <-> the PreferenceHead, whose whole state is its trained `nnx.Param`s."""

    graphdef: Any
    treedef: Any

    @classmethod
    def of(cls, head) -> HeadCodec:
        graphdef, params = nnx.split(head, nnx.Param)  # flax refuses a head with any other state
        return cls(graphdef, jax.tree.structure(params))

    @staticmethod
    def params(head) -> dict[str, Any]:
        return head_params(head)

    def module(self, params: Any):
        state = jax.tree.unflatten(self.treedef, jax.tree.leaves(params))
        return nnx.merge(self.graphdef, state)


def freeze_lower_layers(frozen_layers: int) -> optax.GradientTransformation:
    """Zero the updates of the bottom `frozen_layers` blocks and the input embedding (model.frozen_layers):
    their gradients are already zero, but AdamW's weight decay would still move them."""
    if not frozen_layers:
        return optax.identity()

    def zero_frozen(path, u):
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        if keys[:1] == ["embed_tokens"]:
            return jnp.zeros_like(u)
        if keys[:1] == ["layers"]:
            return u.at[:frozen_layers].set(0)
        return u

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(zero_frozen, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(
    optim: ml_collections.ConfigDict, total_steps: int, frozen_layers: int = 0
) -> tuple[optax.GradientTransformation, Callable]:
    """AdamW + global-norm clipping; linear warm-up to lr, cosine to min_lr_ratio * lr."""
    warmup = int(round(optim.warmup_ratio * total_steps))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=optim.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=optim.lr * optim.min_lr_ratio,
    )
    tx = optax.chain(
        optax.clip_by_global_norm(optim.clip) if optim.clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay),
        freeze_lower_layers(frozen_layers),
    )
    return tx, schedule


def make_head_optimizer(pba: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The preference head's own AdamW (constant `pba.lr`), separate from the policy's schedule and clip."""
    return optax.adamw(float(pba.lr), weight_decay=float(pba.weight_decay))
