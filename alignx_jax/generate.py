"""KV-cached sampling: one compiled prefill, then one compiled decode loop (a `lax.while_loop`,
one model step per token, no recompiles per token), for left-padded batches of prompts.

Sampling follows the release's win-rate setting by default (temperature 0.9, top-k 10, top-p 0.95);
`greedy=True` takes the argmax. Generation stops per row at the
tokenizer's EOS or an eos id of the generation_config.json beside it or of the model config.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import types
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignx_jax import distributed, paths
from alignx_jax.errors import AlignXError, CheckpointError, ConfigError, DataError
from alignx_jax.hardware import available_memory_bytes, matmul_precision, resolve_dtype
from alignx_jax.models.decoder import Decoder
from alignx_jax.models.presets import resolve_model_folder
from alignx_jax.models.safetensors_io import holds_safetensors
from alignx_jax.sharding import target_platform

PROMPT_BUCKET = 32  # prompt lengths are padded to a multiple of this to reuse compilations


def sample_token(
    logits_BV: jax.Array,
    keys_B: jax.Array,
    *,
    greedy: bool,
    temperature: jax.Array,
    top_k: int,
    top_p: jax.Array,
) -> jax.Array:
    """Next token ids [B]: argmax, or temperature -> top-k -> top-p (nucleus) -> categorical, transformers'
    order; each row draws with its own key (`keys_B`). Top-k keeps exactly k tokens (transformers also
    keeps those tied with the k-th)."""
    logits_BV = logits_BV.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    V = logits_BV.shape[-1]
    k = V if top_k <= 0 or top_k >= V else top_k
    # top_k first, so the nucleus sort runs over k candidates rather than the whole vocabulary
    vals_BK, idx_BK = jax.lax.top_k(logits_BV / temperature, k)
    probs_BK = jax.nn.softmax(vals_BK, axis=-1)
    before_BK = jnp.cumsum(probs_BK, axis=-1) - probs_BK
    # the top token always survives (top_p = 0 keeps it alone, as transformers does)
    vals_BK = jnp.where((before_BK < top_p) | (jnp.arange(k) == 0), vals_BK, -jnp.inf)
    choice_B = jax.vmap(jax.random.categorical)(keys_B, vals_BK)
    return jnp.take_along_axis(idx_BK, choice_B[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _generate(
    graphdef,
    state,
    ids_BT,
    mask_BT,
    keys_B,
    stop_ids,
    pad_id,
    temperature,
    top_p,
    *,
    max_new_tokens: int,
    greedy: bool,
    top_k: int,
    per_layer: bool,
):
    model = nnx.merge(graphdef, state)
    B, T = ids_BT.shape
    cache = model.init_cache(B, T + max_new_tokens)  # created inside: no second copy to donate
    draw = partial(sample_token, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p)

    def sample(logits_BV, i):
        # token i of row b draws with fold_in(row key b, i): a row's tokens do not depend on its batch
        return draw(logits_BV, jax.vmap(jax.random.fold_in, (0, None))(keys_B, i))

    with jax.named_scope("prefill"):
        # the output layer on the last position only: [B, V], not the prompt's [B, T, V] logits
        h_BTD, cache = model.prefill(ids_BT, mask_BT, cache)
        w_DV = model.output_embedding().astype(h_BTD.dtype)
        logits_BV = model.cap_logits(jnp.einsum("bd,dv->bv", h_BTD[:, -1], w_DV))
        tok_B = sample(logits_BV, 0)
    params = None
    if per_layer:  # sliced once here, not per layer at every step of the loop (Decoder.layer_params)
        params, cache = model.layer_params(per_layer=True), model.per_layer_cache(cache)
    out_BN = jnp.full((B, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok_B)
    done_B = jnp.isin(tok_B, stop_ids)

    def cond(carry):
        i, _, _, done_B, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done_B)

    def step(carry):
        i, tok_B, cache, done_B, out_BN = carry
        with jax.named_scope("decode_step"):
            logits_B1V, cache = model(
                tok_B[:, None], jnp.ones((B, 1), jnp.int32), cache=cache, layer_params=params
            )
            nxt_B = sample(logits_B1V[:, 0], i)
            nxt_B = jnp.where(done_B, pad_id, nxt_B)  # finished rows emit padding
            out_BN = jax.lax.dynamic_update_slice(out_BN, nxt_B[:, None], (0, i))
            done_B = done_B | jnp.isin(nxt_B, stop_ids)
        return i + 1, nxt_B, cache, done_B, out_BN

    carry = (jnp.int32(1), tok_B, cache, done_B, out_BN)
    _, _, _, _, out_BN = jax.lax.while_loop(cond, step, carry)
    return out_BN


@functools.cache
def _generate_program(options: tuple[tuple[str, Any], ...]) -> Any:
    """`_generate` jitted with a model's XLA options (`DecoderConfig.compiler_options`), one jitted function
    per set of options so its compiles are reused."""
    static = ("graphdef", "max_new_tokens", "greedy", "top_k", "per_layer")
    return jax.jit(_generate, static_argnames=static, compiler_options=dict(options) or None)


# below this many new tokens the unrolled decode loop's longer compile (~10 s more for SmolLM2's 30 layers)
# outweighs what it saves per step (float32 ~50 ms, bf16 ~230 ms on a 2-core CPU: BENCHMARKS.md §4)
PER_LAYER_MIN_NEW_TOKENS = 64


def per_layer_decode(model: Decoder, max_new_tokens: int, available: int | None = None) -> bool:
    """Whether the decode loop runs unrolled over per-layer copies of the weights and KV cache (taken
    once per call) rather than scanned over the stacked ones: on CPU, where the scan's slice of each
    stacked weight is a copy made at every step (a decode step there is bound by memory traffic), for
    at least `PER_LAYER_MIN_NEW_TOKENS` new tokens, when the copy takes at most half of the host memory
    available (`available` bytes, default: the system's figure). Not on GPU/TPU, where the copies
    would double the weights' device memory."""
    if target_platform() != "cpu" or max_new_tokens < PER_LAYER_MIN_NEW_TOKENS:
        return False
    available = available_memory_bytes() if available is None else available
    copy = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(model.layer_params()))
    return available is None or 2 * copy <= available


def _stop_ids(model: Decoder, tokenizer) -> list[int]:
    from alignx_jax.tokenizer import stop_token_ids

    ids = set(stop_token_ids(tokenizer)) if tokenizer is not None else set()
    eos = model.cfg.eos_token_id
    ids.update(eos if isinstance(eos, tuple) else ([eos] if eos is not None else []))
    if not ids:
        raise CheckpointError("no stop token: neither the tokenizer nor the model config names an EOS id")
    return sorted(ids)


@functools.cache
def _warn_past_context(limit: int) -> None:
    # once per process: a benchmark's batches would repeat it (transformers warns too, and goes on)
    print(
        f"alignx: warning: prompt + max_new_tokens exceed the model's max_position_embeddings ({limit}); "
        "positions past it are extrapolated",
        file=sys.stderr,
    )


SEED_LIMIT = 2**32  # jax.random.key(seed) keeps 32 bits here: 2**32 would draw what 0 draws


def check_sampling(
    *, greedy: bool, temperature: float, top_k: int, top_p: float, seed: int, names=None
) -> None:
    """The sampling settings transformers accepts (it raises on the others): temperature finite and > 0,
    top_k >= 0 (0: off), top_p in [0, 1], seed in [0, 2**32). `names` maps each to the flag to name."""
    import math

    name = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "seed": "seed", **(names or {})}
    if not 0 <= int(seed) < SEED_LIMIT:
        raise ConfigError(f"{name['seed']} must be in [0, 2**32), got {seed}")
    if greedy:
        return
    if not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(
            f"{name['temperature']} must be a finite number > 0 (or use greedy), got {temperature}"
        )
    if top_k < 0:
        raise ConfigError(f"{name['top_k']} must be >= 0 (0: no top-k filter), got {top_k}")
    if not 0.0 <= top_p <= 1.0:  # NaN fails too
        raise ConfigError(f"{name['top_p']} must be in [0, 1], got {top_p}")


def generate(
    model: Decoder,
    tokenizer,
    prompts: list[list[int]] | list[str],
    *,
    max_new_tokens: int = 512,
    greedy: bool = False,
    temperature: float = 0.9,
    top_k: int = 10,
    top_p: float = 0.95,
    seed: int = 0,
    stop_ids: list[int] | None = None,
    per_layer: bool | None = None,
    row_ids: list[int] | None = None,
    precision: str = "auto",
) -> list[list[int]]:
    """Generated token ids per prompt, ending with the stop token that ended it (if any).

    `prompts` are token-id lists, or strings tokenized with the tokenizer's defaults (BOS added);
    use `alignx_jax.data.prompts.prompt_ids` for chat-formatted prompts. Row b samples with the key
    `fold_in(key(seed), row_ids[b])` (default: b), so its tokens do not depend on which rows share its
    batch (up to float rounding of the padded batch). `per_layer`: decode over per-layer copies of the
    weights and cache (None: `per_layer_decode`). `precision`: the products' `hardware.matmul_precision`."""
    if not prompts:
        return []
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    check_sampling(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    row_ids = list(range(len(prompts))) if row_ids is None else [int(i) for i in row_ids]
    if len(row_ids) != len(prompts) or not all(0 <= i < SEED_LIMIT for i in row_ids):
        raise DataError(
            f"row_ids: one id in [0, 2**32) per prompt, got {len(row_ids)} for {len(prompts)} prompts"
        )
    if isinstance(prompts[0], str):
        if tokenizer is None:
            raise DataError("text prompts need a tokenizer")
        if any(not p.strip() for p in prompts):  # BOS alone would pass the token check below
            raise DataError("empty prompt")
        prompts = [list(tokenizer(p)["input_ids"]) for p in prompts]
    if any(len(p) == 0 for p in prompts):
        raise DataError("empty prompt")
    V = int(model.cfg.vocab_size)
    for b, p in enumerate(prompts):  # an id past the embedding table reads NaN: silent garbage tokens
        if min(p) < 0 or max(p) >= V:
            raise DataError(
                f"prompt {b + 1}: token id {max(p) if max(p) >= V else min(p)} is outside the model's vocabulary (size {V})"
            )
    stops = list(stop_ids) if stop_ids is not None else _stop_ids(model, tokenizer)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = model.cfg.pad_token_id if pad_id is None else pad_id
    if pad_id is None or not 0 <= int(pad_id) < V:
        # a pad token added to the tokenizer but not the embeddings: padding is masked, any id in range serves
        pad_id = next((i for i in stops if 0 <= i < V), 0)
    pad_id = int(pad_id)
    limit = model.cfg.max_position_embeddings
    if limit and max(len(p) for p in prompts) + max_new_tokens > int(limit):
        _warn_past_context(int(limit))

    B = len(prompts)
    longest = max(len(p) for p in prompts)
    T = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
    ids = np.full((B, T), pad_id, np.int32)
    mask = np.zeros((B, T), np.int32)
    for b, p in enumerate(prompts):  # left padding: every row's last prompt token sits at T-1
        ids[b, T - len(p) :] = p
        mask[b, T - len(p) :] = 1
    keys_B = jax.vmap(jax.random.fold_in, (None, 0))(
        jax.random.key(int(seed)), jnp.asarray(row_ids, jnp.uint32)
    )
    graphdef, state = nnx.split(model)
    program = _generate_program(model.cfg.compiler_options_key(decode=True))
    with matmul_precision(precision, str(model.cfg.dtype)):  # read when the program is traced
        out = program(
            graphdef,
            state,
            jnp.asarray(ids),
            jnp.asarray(mask),
            keys_B,
            jnp.asarray(stops, jnp.int32),
            jnp.int32(pad_id),
            jnp.float32(temperature),
            jnp.float32(top_p),
            max_new_tokens=int(max_new_tokens),
            greedy=bool(greedy),
            top_k=int(top_k),
            per_layer=per_layer_decode(model, max_new_tokens) if per_layer is None else bool(per_layer),
        )
    out = np.asarray(out)
    results = []
    stop_set = set(stops)
    for row in out:
        toks: list[int] = []
        for t in row.tolist():
            toks.append(int(t))
            if t in stop_set:
                break
        results.append(toks)
    return results


# ---- CLI -------------------------------------------------------------------------------------------


def load_model_and_tokenizer(path: str, dtype: str | None = None, mesh=None, cpu_matmul: str = "auto"):
    """An HF folder or hub id, `alignx import` checkpoint or training workdir (or `smollm2`) and its
    tokenizer. `dtype`: params and compute (None: float32 for HF folders, the stored dtype otherwise).
    The params are sharded over `mesh` (default: FSDP over this process's devices, so a model larger
    than one device's memory loads; one device: plain placement). `cpu_matmul`: `DecoderConfig.cpu_matmul`."""

    from alignx_jax.real_model import resolve_model_path
    from alignx_jax.tokenizer import load_tokenizer

    path = resolve_model_path(path, model=True)
    return _load_resolved_model(path, dtype, mesh, cpu_matmul), load_tokenizer(_tokenizer_dir(path))


def load_model(path: str, dtype: str | None = None, mesh=None, cpu_matmul: str = "auto"):
    """`load_model_and_tokenizer`'s model alone, for a caller that has read the tokenizer already."""
    from alignx_jax.real_model import resolve_model_path

    return _load_resolved_model(resolve_model_path(path, model=True), dtype, mesh, cpu_matmul)


def _load_resolved_model(path: str, dtype: str | None, mesh, cpu_matmul: str):
    """`load_model`'s model of `path`, a model path already resolved (`resolve_model_path`)."""
    from alignx_jax.models import checkpoint, hf
    from alignx_jax.sharding import make_mesh

    kwargs: dict = {"cpu_matmul": cpu_matmul}
    if dtype is not None:
        kwargs["dtype"] = resolve_dtype(dtype)
    if mesh is None and jax.local_device_count() > 1:
        mesh = make_mesh(fsdp=-1, devices=jax.local_devices())
    if holds_safetensors(path):
        return hf.load_pretrained(path, mesh=mesh, **kwargs)
    return checkpoint.load_checkpoint(path, mesh=mesh, **kwargs)


def _tokenizer_dir(path: str) -> str:
    """The tokenizer folder of the model folder `path` (`resolve_model_path`'s), read without its weights."""
    from alignx_jax.models import checkpoint

    tok_dir = path if holds_safetensors(path) else checkpoint.resolve_checkpoint(path).tokenizer_dir
    if tok_dir is None:
        raise CheckpointError(f"{path}: no tokenizer files next to the model")
    return tok_dir


def prompt_ids_sha256(ids: list[int]) -> str:
    """A row's prompt token ids as `generate --benchmark` records them: what a resume compares (the ids
    decide the output with the settings; the row's text alone does not say how its persona was rendered)."""
    import hashlib

    return hashlib.sha256(json.dumps(ids).encode("ascii")).hexdigest()


def _prompt_budget(ids: list[int], fmt: str, max_length: int) -> list[int]:
    """Left-truncate a prompt to `max_length - reserve` tokens as the release evaluates; the `paper`
    format's BOS is kept in front of the truncated prompt string."""
    from alignx_jax.data.batching import reserve

    budget = max_length - reserve(max_length)
    if fmt == "paper":
        return ids[:1] + ids[1:][-budget:]
    return ids[-budget:]


SAMPLING_DEFAULTS = {"temperature": 0.9, "top_k": 10, "top_p": 0.95}  # the paper's win-rate setting


def _cli_settings(args) -> dict[str, Any]:
    """What decides a row's output, from the flags, checked before the model loads: the sampling
    settings (the paper's where not given; none with --greedy, which warns about any given), the seed,
    --max-new-tokens and --max-length."""

    given = [f"--{k.replace('_', '-')}" for k in SAMPLING_DEFAULTS if getattr(args, k, None) is not None]
    if getattr(args, "seed", None) is not None:  # None: not given (0); greedy draws nothing with it either
        given.append("--seed")
    seed = 0 if getattr(args, "seed", None) is None else int(args.seed)
    sampling = {
        k: (v if getattr(args, k, None) is None else getattr(args, k)) for k, v in SAMPLING_DEFAULTS.items()
    }
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    max_length = int(getattr(args, "max_length", 8192))
    if max_length < 4:  # eval's rule: the prompt keeps max_length minus the response's reserve
        raise ConfigError(f"--max-length must be at least 4, got {max_length}")
    check_sampling(
        greedy=bool(args.greedy),
        seed=seed,
        **sampling,
        names={"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p", "seed": "--seed"},
    )
    # after the checks: a refused flag (--greedy --seed -1) is one error line, not also named as unused
    if args.greedy and given and paths.is_main_process():
        print(f"alignx: warning: {', '.join(given)} not used with --greedy", file=sys.stderr)
    return {
        "greedy": bool(args.greedy),
        **(dict.fromkeys(sampling) if args.greedy else sampling),
        "seed": None if args.greedy else seed,
        "max_new_tokens": int(args.max_new_tokens),
        "max_length": max_length,
    }


def _resolved_dtype(path: str, dtype: str | None) -> str:
    """The dtype `load_model_and_tokenizer(path, dtype)` loads in: `auto` made concrete for this machine,
    and none given the model's own (float32 for an HF folder, the stored one for a checkpoint). `path`: a
    model path already resolved (`resolve_model_path`)."""
    if dtype is not None:
        return resolve_dtype(dtype)
    if holds_safetensors(path):
        return "float32"
    from alignx_jax.models import checkpoint

    return checkpoint.default_dtype(path)


def _model_identity(model: str, dtype: str | None) -> dict[str, Any]:
    """The model a benchmark file's rows came from (a local path made absolute), for resumes to compare."""
    import os

    local = not paths.is_url(model) and os.path.exists(model)
    return {"model": paths.place(model) if local or paths.is_url(model) else model, "dtype": dtype}


def _other_job(
    done: dict[str, Any],
    *,
    method: str,
    fmt: str,
    prompt: str,
    where: str,
    settings: dict[str, Any],
    ids_sha256: str | None = None,
) -> str | None:
    """How a row already in the --out file was generated differently from this command, or None. Rows
    written before `settings` (or their prompt ids' hash) were recorded are compared on method, format and
    prompt only."""
    if (done.get("method"), done.get("prompt_format")) != (method, fmt):
        return f"with --method {done.get('method')} and prompt format {done.get('prompt_format')}"
    if done.get("prompt") != prompt:
        return f"for another prompt than {where}"
    before = done.get("settings")
    if isinstance(before, dict) and paths.is_url(before.get("model") or ""):  # recorded with its trailing '/'
        before = {**before, "model": paths.place(before["model"])}
    if before is not None and before != settings:
        changed = sorted(k for k in {*before, *settings} if before.get(k) != settings.get(k))
        return (
            "with other settings ("
            + ", ".join(f"{k} {before.get(k)!r}, now {settings.get(k)!r}" for k in changed)
            + ")"
        )
    before_sha = done.get("prompt_ids_sha256")
    if before_sha is not None and ids_sha256 is not None and before_sha != ids_sha256:
        # the same task and settings, rendered otherwise: another profile, persona or template rule
        return (
            f"from other prompt token ids than {where} now renders (its persona or profile shown otherwise?)"
        )
    return None


def _not_yet_generated(
    log,
    name: str,
    path: str,
    rows: list,
    picks: list[int],
    args,
    fmt: str,
    settings,
    default_dtype: str,
    ids: dict[int, list[int]],
) -> list[int]:
    """The picked rows --out does not hold yet; a row it holds must come from the same job (a resume appends
    to what an earlier command generated: its prompt token ids `ids[i]` too), else a DataError naming the
    row."""
    todo = []
    for i in picks:
        done = log.get((name, None, i))
        if done is None:
            todo.append(i)
            continue
        before = done.get("settings")
        if before is not None and "dtype" in before and before["dtype"] is None:
            # rows written before the resolved dtype was recorded hold None: the model's own, which is now
            # recorded as what it resolves to (`auto` stays: it depended on the machine that generated)
            done = {**done, "settings": {**before, "dtype": default_dtype}}
        where = f"{path}'s row {i} (another file under the name {name}?)"
        problem = _other_job(
            done,
            method=args.method,
            fmt=fmt,
            prompt=rows[i]["prompt"],
            where=where,
            settings=settings,
            ids_sha256=prompt_ids_sha256(ids[i]),
        )
        if problem:
            raise DataError(f"row {i} was generated {problem}; use a new --out file", file=args.out)
    return todo


def _rows_left_on_main(find: Callable[[], list[int]]) -> list[int]:
    """The rows left to generate, as `find()` on process 0 says (it writes --out, so the file on its disk
    decides), on every process of a job: all then run the same batches. Its refusal (rows of another job)
    stops every process."""
    todo, problem = [], None
    if paths.is_main_process():
        try:
            todo = find()
        except AlignXError as e:
            problem = e
    distributed.agree(problem, "--out")
    if paths.process_count() <= 1:
        return todo
    from jax.experimental import multihost_utils

    n = int(multihost_utils.broadcast_one_to_all(np.int32(len(todo))))
    if n == 0:
        return []
    mine = np.asarray(todo if paths.is_main_process() else [0] * n, np.int32)
    return [int(i) for i in np.asarray(multihost_utils.broadcast_one_to_all(mine))]


def _benchmark_flags(args) -> tuple[int | None, int]:
    """`generate --benchmark`'s own flags checked: (--limit, --batch-size)."""
    if args.prompt:
        raise ConfigError("give --prompt or --benchmark, not both")
    if args.persona:
        raise ConfigError("--persona applies to --prompt; a benchmark row carries its own persona")
    if not getattr(args, "out", None):
        raise ConfigError("--benchmark needs --out FILE.jsonl")
    if getattr(args, "json", False):  # it was dropped without a word: --out's rows are JSON lines already
        raise ConfigError("--json applies to --prompt, not to --benchmark (--out holds JSON lines)")
    limit = getattr(args, "limit", None)
    batch_size = 8 if getattr(args, "batch_size", None) is None else int(args.batch_size)
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be positive, got {limit}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}")
    return limit, batch_size


def _check_profiles(sample) -> None:
    """--method pba: each picked row's profile, before the model loads; a DataError names the row."""
    from alignx_jax.data import prompts as prompts_lib

    for i in sample.picks:
        try:
            prompts_lib.resolve_profile(sample.rows[i])
        except DataError as e:  # a blank profile read, or none and no direction: one line naming the row
            file, at = sample.places[i]
            raise e.at(file=file, row=at) from None


@dataclasses.dataclass(frozen=True)
class _BenchmarkJob:
    """What `generate --benchmark` was asked, checked before the tokenizer or model loads."""

    name: str  # the benchmark's name, as its rows record it
    path: str  # its file or folder
    rows: list[dict]
    picks: list[int]  # the rows to generate (--limit's)
    batch_size: int
    model_path: str  # --model resolved once: the dtype, trained format and load read it
    fmt: str  # the prompt format
    given_dtype: str | None  # --dtype as given (None: the model's own)
    settings: dict[str, Any]  # what each row records and a resume compares (the dtype resolved)


def _benchmark_job(args) -> _BenchmarkJob:
    """`generate --benchmark`'s flags, benchmark rows (PBA's profiles too) and model folder checked, in
    the order their errors are reported."""
    from alignx_jax.data.benchmarks import benchmark_sample, parse_benchmark_arg, warn_empty_files
    from alignx_jax.evaluate import default_prompt_format

    limit, batch_size = _benchmark_flags(args)
    settings = {**_model_identity(args.model, getattr(args, "dtype", None)), **_cli_settings(args)}
    name, path = parse_benchmark_arg(args.benchmark)
    if not paths.exists(path):  # a bucket's file too (gs://)
        raise DataError(f"--benchmark {name}: no such file or folder", file=path)
    problem = paths.refuse_inside_inputs("--out", args.out, [(f"--benchmark {name}", path)])
    if problem:  # appended to: never the benchmark, nor a file the next read of its folder takes for data
        raise ConfigError(problem)
    # eval's loader: a split folder is refused, and --limit takes eval --limit's rows
    sample = benchmark_sample(name, path, limit=limit)
    warn_empty_files(name, path, sample, "generates for the folder's other files")
    if args.method == "pba":
        _check_profiles(sample)
    # resolved once (a hub id's snapshot, a gs:// folder's copy): the dtype, trained format and load read it
    model_path = resolve_model_folder(args.model, "--model")
    # the rows record (and a resume compares) the dtype the model computes in, not the flag's `auto` or none
    given_dtype = settings["dtype"]
    settings["dtype"] = _resolved_dtype(model_path, given_dtype)
    fmt = default_prompt_format(
        args.model, getattr(args, "prompt_format", None), fallback="paper", resolved=model_path
    )
    return _BenchmarkJob(
        name, path, sample.rows, sample.picks, batch_size, model_path, fmt, given_dtype, settings
    )


def _benchmark_prompt_ids(tokenizer, job: _BenchmarkJob, method: str) -> dict[int, list[int]]:
    """Each picked row's prompt token ids, cut to --max-length's prompt budget."""
    from alignx_jax.data import prompts as prompts_lib

    return {
        i: _prompt_budget(
            prompts_lib.prompt_ids(tokenizer, job.rows[i], method=method, fmt=job.fmt),
            job.fmt,
            job.settings["max_length"],
        )
        for i in job.picks
    }


def _benchmark_record(job: _BenchmarkJob, method: str, i: int, prompt_ids: list[int], output: str) -> dict:
    """Row `i`'s line of the --out file."""
    from alignx_jax.data.benchmarks import persona_group

    row = job.rows[i]
    return {
        "benchmark": job.name,
        "persona": None,
        "index": i,
        "id": row.get("id", i),
        "group": persona_group(row),
        "method": method,
        "prompt_format": job.fmt,
        "prompt": row["prompt"],
        "prompt_ids_sha256": prompt_ids_sha256(prompt_ids),
        "output": output,
        "settings": job.settings,
    }


def _generate_rows(log, model, tokenizer, job: _BenchmarkJob, ids, todo: list[int], args) -> None:
    """Generate the rows `todo` batch by batch, each batch appended to `log` (one agreed check of its write,
    `append_agreed`) before the next starts."""
    from alignx_jax.metrics import progress_bar

    settings = job.settings
    todo = sorted(todo, key=lambda i: (-len(ids[i]), i))  # similar lengths batch together: less padding
    main = paths.is_main_process()
    with progress_bar(total=len(todo), desc=f"generate {job.name}", unit="row", disable=not main) as bar:
        for start in range(0, len(todo), job.batch_size):
            batch = todo[start : start + job.batch_size]
            # each row draws by its own index: a resumed run, or another --batch-size, draws what an
            # uninterrupted one would
            outs = generate(
                model,
                tokenizer,
                [ids[i] for i in batch],
                max_new_tokens=settings["max_new_tokens"],
                greedy=settings["greedy"],
                **_sampling_of(settings),
                seed=settings["seed"] or 0,  # None under --greedy, which draws nothing
                row_ids=batch,
                precision=getattr(args, "matmul_precision", "auto"),
            )
            decoded = (tokenizer.decode(toks, skip_special_tokens=True) for toks in outs)
            log.append_agreed(
                (_benchmark_record(job, args.method, i, ids[i], out) for i, out in zip(batch, decoded)),
                "--out",
            )
            bar.update(len(batch))


def _generate_benchmark(args) -> int:
    """`alignx generate --benchmark NAME=PATH --out FILE.jsonl`: one line per row (benchmark, index, id,
    method, prompt_format, prompt, output), appended batch by batch; a rerun skips the rows already in
    FILE (a cut last line is dropped), so an interrupted run resumes."""
    from alignx_jax.evaluate import PerExampleLog
    from alignx_jax.tokenizer import load_tokenizer

    job = _benchmark_job(args)
    # the tokenizer alone, before the model: a resume compares the rows' prompt ids
    tokenizer = load_tokenizer(_tokenizer_dir(job.model_path))
    ids = _benchmark_prompt_ids(tokenizer, job, args.method)
    # a multi-process job: every process generates on its own devices, process 0 alone writes
    main = paths.is_main_process()
    log = PerExampleLog.for_job(args.out, flag="--out", kind="generate")
    try:
        settings = job.settings
        default_dtype = (
            settings["dtype"] if job.given_dtype is None else _resolved_dtype(job.model_path, None)
        )
        todo = _rows_left_on_main(
            lambda: _not_yet_generated(
                log, job.name, job.path, job.rows, job.picks, args, job.fmt, settings, default_dtype, ids
            )
        )
        if not todo:
            if main:
                print(f"{args.out}: all {len(job.picks)} rows already generated", file=sys.stderr)
            return 0
        # the model alone: its tokenizer is read above
        model = load_model(job.model_path, settings["dtype"], cpu_matmul=getattr(args, "cpu_matmul", "auto"))
        _generate_rows(log, model, tokenizer, job, ids, todo, args)
    finally:
        log.close()
    if main:
        print(f"{args.out}: {len(todo)} rows generated, {len(job.picks)} in all")
    return 0


def _sampling_of(settings: dict[str, Any]) -> dict[str, Any]:
    """generate()'s temperature/top_k/top_p from the settings (greedy keeps none: any value passes)."""
    return {k: (v if settings[k] is None else settings[k]) for k, v in SAMPLING_DEFAULTS.items()}


def cli_generate(args) -> int:
    from alignx_jax.evaluate import check_cpu_matmul

    check_cpu_matmul(getattr(args, "cpu_matmul", "auto"))
    if getattr(args, "benchmark", None):
        return _generate_benchmark(args)
    if not args.prompt:
        raise DataError("give --prompt TEXT (repeatable), or --benchmark NAME=PATH with --out FILE.jsonl")
    for flag, value in (("--out", args.out), ("--limit", args.limit), ("--batch-size", args.batch_size)):
        if value is not None:  # a --prompt run prints; these would be ignored
            raise ConfigError(f"{flag} applies to --benchmark, not to --prompt")
    settings = _cli_settings(args)
    for i, text in enumerate(args.prompt):  # the chat template adds tokens to any text: check the text itself
        if not text.strip():
            raise DataError(f"--prompt number {i + 1} is empty; give the text to respond to")
    persona: dict[str, Any] = {}
    if args.method != "none" and not args.persona:
        raise DataError(f"--method {args.method} needs --persona FILE.json (the persona fields of a row)")
    if args.persona:
        from alignx_jax.data.schema import read_persona_file

        persona = read_persona_file(args.persona, needs=args.method)
        if args.method == "none":  # the non-personalized prompt reads no persona
            print(
                f"alignx: warning: --persona {args.persona} is not read with --method none", file=sys.stderr
            )
    model_path = resolve_model_folder(args.model, "--model")  # once: the load and the trained format read it
    model, tokenizer = load_model_and_tokenizer(
        model_path, getattr(args, "dtype", None), cpu_matmul=getattr(args, "cpu_matmul", "auto")
    )
    try:
        from alignx_jax.data import prompts as prompts_lib
    except ImportError as e:  # pragma: no cover - the data package ships with the project
        raise AlignXError(f"prompt rendering unavailable ({e})") from e
    from alignx_jax.evaluate import default_prompt_format

    fmt = default_prompt_format(
        args.model, getattr(args, "prompt_format", None), fallback="chat", resolved=model_path
    )
    prompt_ids = [
        _prompt_budget(
            prompts_lib.prompt_ids(tokenizer, {**persona, "prompt": text}, method=args.method, fmt=fmt),
            fmt,
            settings["max_length"],
        )
        for text in args.prompt
    ]
    outs = generate(
        model,
        tokenizer,
        prompt_ids,
        max_new_tokens=settings["max_new_tokens"],
        greedy=settings["greedy"],
        **_sampling_of(settings),
        seed=settings["seed"] or 0,
        precision=getattr(args, "matmul_precision", "auto"),
    )
    if not paths.is_main_process():  # a multi-process job: process 0 prints
        return 0
    for p_ids, toks in zip(prompt_ids, outs):
        text = tokenizer.decode(toks, skip_special_tokens=True)
        if args.json:
            print(json.dumps({"prompt_ids": p_ids, "token_ids": toks, "text": text}))
        else:
            print(text)
            print()
    return 0


class _CallableModule(types.ModuleType):
    """`alignx_jax.generate` is both this module and (lazily) the function; importing the submodule
    rebinds the package attribute to the module, so the module forwards calls to `generate`."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
