"""DPO training (ICA / PBA / non-personalized): train state, the jitted sharded step, the loop.

`alignx train --config=CONFIG.py --config.workdir=W [--config.KEY=VALUE ...]`

One optimizer step = one call of a jitted function on the whole global batch: the batch arrives as
`[M, b, 2, T]` (M microbatches of b pairs, chosen and rejected side by side so a device always
holds both halves of its pairs), and `lax.scan` accumulates float32 gradients over the M
microbatches before one AdamW update. Params are float32 master weights; the decoder computes in
`model.dtype` (bf16 on accelerators). The reference is a frozen copy of the initial weights in the
compute dtype (`loss.reference=on_the_fly`), or its log-probs are computed once in a pass over the
exact batch sequence the run will see and stored as `W/ref_logps.p<process>.npy`
(`loss.reference=precomputed`; the frozen copy is then freed before training).

Workdir `W`: `config.json`, `reference/` (HF folder of the frozen reference + tokenizer),
`metrics.jsonl`, `tensorboard/`, `checkpoints/<step>/{params,opt_state,meta}`. SIGTERM/SIGINT
save at the next step boundary and exit 0; rerunning the same command resumes from the latest
checkpoint. A non-finite loss stops the run (exit 1) without saving the bad state.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from alignx_jax import losses
from alignx_jax import sharding as shd
from alignx_jax.checkpointing import TrainCheckpointer, abstract_like
from alignx_jax.config import config_to_json, load_config
from alignx_jax.errors import AlignXError, ConfigError
from alignx_jax.metrics import MetricsWriter

METHODS = ("ica", "pba", "none")
REFERENCE_MODES = ("on_the_fly", "precomputed")


# ----------------------------------------------------------------------------- config checks


def validate_config(cfg: ml_collections.ConfigDict) -> None:
    """Consistency checks a key lookup cannot do; each failure is one ConfigError line."""
    if not cfg.workdir:
        raise ConfigError("--config.workdir is required (the run's output folder)")
    if not cfg.model.hf_path and not cfg.model.init.enabled:
        raise ConfigError("--config.model.hf_path is required (an HF folder or `alignx import` checkpoint)")
    if not cfg.data.train and cfg.data.synth_users <= 0:
        raise ConfigError("--config.data.train is required (parquet/JSONL/JSON file or folder)")
    if cfg.data.method not in METHODS:
        raise ConfigError(f"data.method={cfg.data.method!r}: expected one of {', '.join(METHODS)}")
    if cfg.loss.type not in losses.LOSS_TYPES:
        raise ConfigError(f"loss.type={cfg.loss.type!r}: expected one of {', '.join(losses.LOSS_TYPES)}")
    if cfg.loss.reference not in REFERENCE_MODES:
        raise ConfigError(f"loss.reference={cfg.loss.reference!r}: expected one of {', '.join(REFERENCE_MODES)}")
    if cfg.loss.beta <= 0:
        raise ConfigError(f"loss.beta must be positive, got {cfg.loss.beta}")
    if cfg.loss.type == "robust" and not 0 <= cfg.loss.label_smoothing < 0.5:
        raise ConfigError("loss.label_smoothing must be in [0, 0.5) for the robust loss")
    if cfg.loss.sft_norm not in ("length", "sum"):
        raise ConfigError(f"loss.sft_norm={cfg.loss.sft_norm!r}: expected 'length' or 'sum'")
    gb, mb = cfg.train.global_batch, cfg.train.micro_batch or cfg.train.global_batch
    if gb <= 0 or mb <= 0 or gb % mb:
        raise ConfigError(f"train.global_batch={gb} must be a positive multiple of train.micro_batch={mb}")
    if cfg.train.steps == 0 or cfg.train.steps < -1 or (cfg.train.steps == -1 and cfg.train.epochs <= 0):
        raise ConfigError("train.steps must be positive, or -1 with train.epochs > 0")
    if max(cfg.data.buckets) < cfg.data.max_length:
        raise ConfigError(f"data.max_length={cfg.data.max_length} exceeds the largest of data.buckets "
                          f"{tuple(cfg.data.buckets)}")
    if cfg.data.method == "pba" and cfg.pba.preference != "golden":
        raise ConfigError(f"pba.preference={cfg.pba.preference!r} needs the preference head's predictions; "
                          "this build trains PBA with the golden P~ only")


def rules_from_config(cfg: ml_collections.ConfigDict) -> shd.Rules:
    return tuple((str(name), None if axes is None else (axes if isinstance(axes, str) else tuple(axes)))
                 for name, axes in cfg.sharding.rules)


# ----------------------------------------------------------------------------- model


def _run_options(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    remat = cfg.model.remat
    if isinstance(remat, bool):  # True = recompute everything per layer (gradient checkpointing)
        remat = "full" if remat else "none"
    return {"remat": str(remat), "scan_layers": bool(cfg.model.scan_layers),
            "attention_impl": str(cfg.model.attention_impl)}


def load_tokenizer_for(cfg: ml_collections.ConfigDict):
    """(tokenizer, folder holding its files or None for the shipped one)."""
    from alignx_jax.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer

    path = cfg.model.tokenizer or cfg.model.hf_path or None
    tok = load_tokenizer(path)
    return tok, (path or TINY_TOKENIZER_DIR)


def build_policy(cfg: ml_collections.ConfigDict, tokenizer, mesh, rules):
    """The policy Decoder with float32 (param_dtype) master weights placed on the mesh."""
    from alignx_jax.models import hf
    from alignx_jax.models.decoder import Decoder, DecoderConfig

    opts = _run_options(cfg)
    if cfg.model.hf_path:
        path = cfg.model.hf_path
        if os.path.isdir(os.path.join(path, "params")) or os.path.isdir(os.path.join(path, "checkpoints")):
            return hf.load_checkpoint(path, dtype=cfg.model.param_dtype, mesh=mesh, rules=rules,
                                      compute_dtype=cfg.model.dtype, **opts)
        return hf.load_pretrained(path, cfg.model.param_dtype, mesh, rules, compute_dtype=cfg.model.dtype, **opts)
    init = cfg.model.init
    hf_cfg = {k: init[k] for k in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "num_key_value_heads", "head_dim", "rope_theta",
                                   "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings")}
    hf_cfg["vocab_size"] = len(tokenizer) if init.vocab_size == -1 else int(init.vocab_size)
    hf_cfg.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    dcfg = DecoderConfig.from_hf(hf_cfg, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, **opts)
    model = Decoder(dcfg, rngs=nnx.Rngs(int(init.seed)))
    return shd.shard_model(model, mesh, rules)


@dataclasses.dataclass(frozen=True)
class ParamsCodec:
    """Pure-dict params (what we train, checkpoint and export) <-> the Decoder module."""
    graphdef: Any
    treedef: Any

    @classmethod
    def of(cls, model) -> ParamsCodec:
        graphdef, state = nnx.split(model)
        pure = nnx.to_pure_dict(state)
        # leaves of the State and of its pure dict must line up one to one (both sort dict keys)
        def names(tree):
            return [tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
                    for path, _ in jax.tree_util.tree_leaves_with_path(tree)]
        if names(state) != names(pure):
            raise RuntimeError("decoder state and its pure dict disagree on leaf order")
        return cls(graphdef, jax.tree.structure(state))

    def module(self, params: Any):
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, jax.tree.leaves(params)))


# ----------------------------------------------------------------------------- the step


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
    """AdamW + global-norm clipping; linear warm-up to lr, cosine to min_lr_ratio * lr."""
    warmup = int(round(optim.warmup_ratio * total_steps))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=optim.lr * optim.min_lr_ratio)
    tx = optax.chain(
        optax.clip_by_global_norm(optim.clip) if optim.clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay))
    return tx, schedule


def pair_logps(codec: ParamsCodec, params: Any, mb: dict[str, jax.Array], chunk: int | None) -> jax.Array:
    """Summed response log-probs `[b, 2]` (chosen, rejected) for one microbatch `[b, 2, T]`."""
    with jax.named_scope("pair_logps"):
        model = codec.module(params)
        b, two, T = mb["input_ids"].shape
        flat = {k: mb[k].reshape(b * two, T) for k in ("input_ids", "attention_mask", "positions", "loss_mask")}
        h_ND = model.hidden_states(flat["input_ids"], flat["attention_mask"], flat["positions"])
        w_DV = model.output_embedding().astype(h_ND.dtype)
        lp = losses.sequence_logps(h_ND, w_DV, flat["input_ids"], flat["loss_mask"], chunk=chunk)
        return lp.reshape(b, two)


def make_train_step(codec: ParamsCodec, tx: optax.GradientTransformation, loss_cfg: ml_collections.ConfigDict,
                    *, precomputed: bool, grad_shardings: Any = None) -> Callable:
    """`step(params, opt_state, ref_params, batch) -> (params, opt_state, metrics)`, to be jitted.

    batch: input_ids/attention_mask/positions/loss_mask `[M, b, 2, T]`, pair_mask `[M, b]`, and
    ref_logps `[M, b, 2]` when precomputed. The loss is the mean over all real pairs of the global
    batch, so it does not depend on how the batch is cut into microbatches.
    """
    chunk = int(loss_cfg.logps_chunk) or None
    beta = float(loss_cfg.beta)

    def step(params, opt_state, ref_params, batch):
        n_pairs = jnp.maximum(jnp.sum(batch["pair_mask"].astype(jnp.float32)), 1.0)

        def micro(carry, mb):
            grads_acc, sums_acc = carry
            pm = mb["pair_mask"].astype(jnp.float32)
            ntok = jnp.sum(mb["loss_mask"].astype(jnp.float32), axis=-1)  # [b, 2]
            if precomputed:
                ref = mb["ref_logps"]
            else:
                ref = jax.lax.stop_gradient(pair_logps(codec, ref_params, mb, chunk))

            def loss_fn(p):
                lp = pair_logps(codec, p, mb, chunk)
                per = losses.dpo_per_pair(lp[:, 0], lp[:, 1], ref[:, 0], ref[:, 1], loss_cfg,
                                          chosen_tokens=ntok[:, 0], rejected_tokens=ntok[:, 1])
                return jnp.sum(per * pm) / n_pairs, lp

            (loss, lp), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            sums = losses.dpo_sums(lp[:, 0], lp[:, 1], ref[:, 0], ref[:, 1], beta, pm)
            sums["loss"] = loss
            grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
            if grad_shardings is not None:
                grads_acc = jax.lax.with_sharding_constraint(grads_acc, grad_shardings)
            return (grads_acc, jax.tree.map(jnp.add, sums_acc, sums)), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        if grad_shardings is not None:
            zeros = jax.lax.with_sharding_constraint(zeros, grad_shardings)
        sum_keys = ("reward_accuracy", "rewards_chosen", "rewards_rejected", "margin", "logps_chosen",
                    "logps_rejected", "pairs", "loss")
        init = (zeros, {k: jnp.zeros((), jnp.float32) for k in sum_keys})
        (grads, sums), _ = jax.lax.scan(micro, init, batch)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {k: v / n_pairs for k, v in sums.items() if k not in ("loss", "pairs")}
        metrics.update(loss=sums["loss"], grad_norm=grad_norm, pairs=sums["pairs"])
        return params, opt_state, metrics

    return step


def make_ref_logps_fn(codec: ParamsCodec, loss_cfg: ml_collections.ConfigDict) -> Callable:
    """`fn(ref_params, batch) -> ([M, b, 2] reference log-probs, batch["slot"])` (precompute pass)."""
    chunk = int(loss_cfg.logps_chunk) or None

    def fn(ref_params, batch):
        def micro(_, mb):
            return None, pair_logps(codec, ref_params, mb, chunk)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "positions", "loss_mask")}
        return jax.lax.scan(micro, None, inputs)[1], batch["slot"]

    return fn


# ----------------------------------------------------------------------------- batches


def to_microbatches(batch: dict[str, np.ndarray], num_micro: int, T: int | None = None) -> dict[str, np.ndarray]:
    """A collated DPO batch (2B rows, chosen first) -> the step layout `[M, B/M, 2, T]`."""
    B = batch["pair_mask"].shape[0]
    b = B // num_micro
    out: dict[str, np.ndarray] = {}
    for k in ("input_ids", "attention_mask", "positions", "loss_mask"):
        x = batch[k]
        if T is not None and x.shape[1] < T:  # widen to the step's common length (mask 0)
            x = np.pad(x, ((0, 0), (0, T - x.shape[1])))
        out[k] = np.stack([x[:B], x[B:]], axis=1).reshape(num_micro, b, 2, x.shape[1])
    out["pair_mask"] = batch["pair_mask"].reshape(num_micro, b)
    if "ref_logps" in batch:
        out["ref_logps"] = np.asarray(batch["ref_logps"], np.float32).reshape(num_micro, b, 2)
    return out


def batch_shardings(batch: dict[str, np.ndarray], mesh, rules) -> dict[str, NamedSharding]:
    """Pairs (axis 1) over the batch mesh axes; everything else replicated."""
    out = {}
    for k, v in batch.items():
        axes = (None, "activation_batch") + (None,) * (v.ndim - 2)
        gshape = list(v.shape)
        gshape[1] *= jax.process_count()
        out[k] = shd.logical_sharding(axes, mesh, rules, gshape)
    return out


def put_batch(batch: dict[str, np.ndarray], shardings: dict[str, NamedSharding]) -> dict[str, jax.Array]:
    """Each process contributes its own pairs; together they form the global batch."""
    out = {}
    for k, v in batch.items():
        gshape = list(v.shape)
        gshape[1] *= jax.process_count()
        out[k] = jax.make_array_from_process_local_data(shardings[k], v, tuple(gshape))
    return out


# ----------------------------------------------------------------------------- the run


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop saves at the next step boundary and exits 0."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. called from a worker): no handler
                pass

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()


def _ensure_data(cfg: ml_collections.ConfigDict, workdir: str, is_main: bool) -> str:
    """`data.train`, or synthetic users written into W/data once (as `alignx synth` does)."""
    if cfg.data.train:
        return cfg.data.train
    out = os.path.join(workdir, "data")
    if is_main and not os.path.exists(os.path.join(out, "data.parquet")):
        from alignx_jax.data import synth
        world = synth.generate_world(int(cfg.data.synth_users), int(cfg.data.synth_pairs_per_user),
                                     int(cfg.data.synth_seed))
        synth.write_world(world, out)
    _sync("synth")
    return out


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _write_reference(cfg, model, workdir: str, tokenizer_dir: str, is_main: bool) -> None:
    """W/reference: the frozen reference as an HF folder with its tokenizer (written once)."""
    from alignx_jax.models import hf

    ref = os.path.join(workdir, "reference")
    if os.path.isfile(os.path.join(ref, "config.json")):
        return
    src = cfg.model.hf_path
    is_hf = bool(src) and os.path.isfile(os.path.join(src, "config.json")) and any(
        n.endswith(".safetensors") for n in os.listdir(src))
    if is_hf:
        if is_main:  # an HF folder already is the reference: copy its files (no multi-host gather)
            tmp = ref + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            for name in os.listdir(src):
                if os.path.isfile(os.path.join(src, name)):
                    shutil.copyfile(os.path.join(src, name), os.path.join(tmp, name))
            os.replace(tmp, ref)
    elif jax.process_count() == 1:
        tmp = ref + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        hf.save_hf(model, tmp, tokenizer_dir=tokenizer_dir)
        os.replace(tmp, ref)
    elif is_main:
        print("alignx train: W/reference not written (multi-host run from an orbax checkpoint; "
              "export the initial checkpoint with `alignx export`)", file=sys.stderr)
    _sync("reference")


def _tree_shardings(tree: Any, mesh) -> Any:
    rep = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else rep, tree)


def run_training(cfg: ml_collections.ConfigDict) -> int:
    """The whole run for a loaded config; returns the exit status."""
    validate_config(cfg)
    if cfg.train.distributed:
        jax.distributed.initialize()
    mesh = shd.mesh_from_config(cfg.mesh)
    rules = rules_from_config(cfg)
    workdir = os.path.abspath(cfg.workdir)
    is_main = jax.process_index() == 0
    if is_main:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            f.write(config_to_json(cfg) + "\n")

    from alignx_jax.data import batching, sources

    tokenizer, tokenizer_dir = load_tokenizer_for(cfg)
    data_path = _ensure_data(cfg, workdir, is_main)
    source = sources.open_source(data_path, skip_bad=bool(cfg.data.skip_bad_rows))
    skipped = int(getattr(source, "skipped", 0))
    if len(source) == 0:
        raise AlignXError(f"{data_path}: no training rows")

    gb = int(cfg.train.global_batch)
    num_micro = gb // int(cfg.train.micro_batch or gb)
    pc, pi = jax.process_count(), jax.process_index()
    if gb % pc or (gb // pc) % num_micro:
        raise ConfigError(f"train.global_batch={gb} must split evenly over {pc} processes and "
                          f"{num_micro} microbatches")
    seed = int(cfg.train.seed)
    buckets = tuple(int(b) for b in cfg.data.buckets)
    pad_id = int(tokenizer.pad_token_id)
    truncated = [0]  # rows whose prompt was cut to fit (saved with the loader state)

    def example_fn(row, rng, index):
        ex = batching.make_example(
            tokenizer, row, method=cfg.data.method, persona=cfg.data.persona, max_length=int(cfg.data.max_length),
            prompt_format=cfg.data.prompt_format, rng=rng, overflow=cfg.data.overflow, index=index)
        truncated[0] += int(ex is not None and ex.truncated)
        return ex

    def new_loader():
        return sources.TrainLoader(source, example_fn, pairs_per_batch=gb // pc, pad_id=pad_id, buckets=buckets,
                                   seed=seed, shuffle=bool(cfg.data.shuffle), num_epochs=None, on_drop="pad",
                                   shard_index=pi, shard_count=pc)

    loader = new_loader()
    total_steps = (int(cfg.train.steps) if cfg.train.steps > 0
                   else max(1, int(cfg.train.epochs) * loader.steps_per_epoch))

    def host_batch(coll: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        stats = batching.padding_stats(coll)
        T = coll["input_ids"].shape[1]
        if pc > 1:  # every process must agree on the step's length
            from jax.experimental import multihost_utils
            T = int(np.max(multihost_utils.process_allgather(np.asarray(T))))
        return to_microbatches(coll, num_micro, T), stats

    # --- model, reference, optimizer
    policy = build_policy(cfg, tokenizer, mesh, rules)
    _write_reference(cfg, policy, workdir, tokenizer_dir, is_main)
    codec = ParamsCodec.of(policy)
    params = nnx.to_pure_dict(nnx.state(policy))
    del policy
    compute_dt = jnp.dtype(cfg.model.dtype)
    # a separate buffer even when dtypes agree: the policy's buffers are donated to the step
    ref_params = jax.tree.map(lambda x: jnp.array(x, dtype=compute_dt, copy=True), params)
    tx, schedule = make_optimizer(cfg.optim, total_steps)
    param_sh = _tree_shardings(params, mesh)
    opt_state = tx.init(params)
    opt_sh = _tree_shardings(opt_state, mesh)
    opt_state = jax.device_put(opt_state, opt_sh)
    rep = NamedSharding(mesh, PartitionSpec())
    precomputed = cfg.loss.reference == "precomputed"

    # --- resume
    ckpt = TrainCheckpointer(os.path.join(workdir, "checkpoints"), keep=int(cfg.checkpoint.keep),
                             async_save=bool(cfg.checkpoint["async"]))
    start = 0
    latest = ckpt.latest_step()
    if latest is not None:
        params, opt_state, meta = ckpt.restore(latest, abstract_like(params), abstract_like(opt_state))
        loader.set_state(meta["loader"])
        truncated[0] = int(meta.get("rows_truncated", 0))
        start = int(meta["step"])
        if is_main:
            print(f"alignx train: resuming from {ckpt.directory}/{latest} (step {start} of {total_steps})",
                  file=sys.stderr)

    # --- precomputed reference: one pass over the batches this run will see, stored per process
    ref_table = None
    if precomputed:
        ref_path = os.path.join(workdir, f"ref_logps.p{pi}.npy")
        want_shape = (total_steps, gb // pc, 2)
        if os.path.exists(ref_path) and np.load(ref_path, mmap_mode="r").shape == want_shape:
            ref_table = np.load(ref_path)
        else:
            ref_fn = jax.jit(make_ref_logps_fn(codec, cfg.loss), out_shardings=rep)
            pre_loader = new_loader()
            saved_truncated = truncated[0]
            ref_table = np.zeros(want_shape, np.float32)
            local_pairs = gb // pc
            with shd.use_mesh(mesh, rules):
                for s in range(total_steps):
                    hb, _ = host_batch(next(pre_loader)[0])
                    # global slot ids tell each process which of the gathered results are its own
                    hb["slot"] = (pi * local_pairs + np.arange(local_pairs, dtype=np.int32)).reshape(num_micro, -1)
                    lp, slot = jax.device_get(ref_fn(ref_params, put_batch(hb, batch_shardings(hb, mesh, rules))))
                    lp, slot = np.asarray(lp).reshape(-1, 2), np.asarray(slot).reshape(-1)
                    mine = slot // local_pairs == pi
                    ref_table[s][slot[mine] % local_pairs] = lp[mine]
            truncated[0] = saved_truncated
            if is_main or pc > 1:
                np.save(ref_path + ".tmp.npy", ref_table)
                os.replace(ref_path + ".tmp.npy", ref_path)
        ref_params = None  # the frozen copy is no longer needed: its memory goes to training

    step_fn = jax.jit(make_train_step(codec, tx, cfg.loss, precomputed=precomputed, grad_shardings=param_sh),
                      out_shardings=(param_sh, opt_sh, rep), donate_argnums=(0, 1))

    writer = MetricsWriter(workdir, enabled=is_main, resume_step=start)
    stop = _StopFlag()
    stop.install()
    bar = None
    if is_main and cfg.train.progress:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)

    def meta_for(step: int) -> dict[str, Any]:
        return {"step": step, "total_steps": total_steps, "seed": seed, "loader": loader.get_state(),
                "rows_truncated": truncated[0], "rows_skipped": skipped}

    step = start
    last_saved = latest
    every = max(1, int(cfg.checkpoint.every_steps))
    try:
        while step < total_steps:
            if stop.signum is not None:
                break
            t0 = time.perf_counter()
            coll, info = next(loader)
            hb, stats = host_batch(coll)
            if precomputed:
                hb["ref_logps"] = ref_table[step].reshape(num_micro, -1, 2)
            batch = put_batch(hb, batch_shardings(hb, mesh, rules))
            with shd.use_mesh(mesh, rules):
                params, opt_state, m = step_fn(params, opt_state, ref_params, batch)
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            dt = time.perf_counter() - t0
            step += 1
            if not np.isfinite(m["loss"]):
                ckpt.wait()
                where = f"; last good checkpoint: step {last_saved}" if last_saved is not None else ""
                raise AlignXError(f"non-finite loss ({m['loss']}) at step {step}{where}")
            if step % max(1, int(cfg.train.log_every)) == 0 or step == total_steps:
                writer.write(step, {
                    **m, "learning_rate": float(schedule(step - 1)), "epoch": info["epoch"],
                    "tokens_per_sec": stats["real_tokens"] * pc / dt, "step_time": dt,
                    "rows_dropped": info["rows_dropped"], "rows_truncated": truncated[0], "rows_skipped": skipped,
                    "padding_fraction": stats["padding_fraction"]})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m['reward_accuracy']:.2f}")
            if step % every == 0 or step == total_steps:
                ckpt.save(step, params, opt_state, meta_for(step))
                last_saved = step
        if stop.signum is not None and step < total_steps:
            if last_saved != step:
                ckpt.save(step, params, opt_state, meta_for(step))
            ckpt.wait()
            if is_main:
                name = signal.Signals(stop.signum).name
                print(f"alignx train: {name} received: saved step {step} to {ckpt.directory}; "
                      "rerun the same command to resume", file=sys.stderr)
            return 0
        ckpt.wait()
        if is_main:
            print(f"alignx train: done, {step} steps; checkpoints in {ckpt.directory}", file=sys.stderr)
        return 0
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
        writer.close()
        ckpt.close()


def cli_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config_path, getattr(args, "overrides", []) or [])
    return run_training(cfg)
