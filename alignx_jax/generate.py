"""KV-cached sampling: one compiled prefill, then one compiled decode loop (a `lax.while_loop`,
one model step per token, no recompiles per token), for left-padded batches of prompts.

Sampling follows the release's win-rate setting by default (temperature 0.9, top-k 10, top-p 0.95);
`greedy=True` takes the argmax. Generation stops per row at EOS / `<|eot_id|>` / `<|end_of_text|>`.
"""

from __future__ import annotations

import functools
import json
import sys
import types
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignx_jax import paths
from alignx_jax.errors import AlignXError, CheckpointError, DataError
from alignx_jax.hardware import available_memory_bytes, resolve_dtype
from alignx_jax.models.decoder import Decoder
from alignx_jax.sharding import target_platform

PROMPT_BUCKET = 32  # prompt lengths are padded to a multiple of this to reuse compilations


def sample_token(
    logits_BV: jax.Array,
    key: jax.Array,
    *,
    greedy: bool,
    temperature: jax.Array,
    top_k: int,
    top_p: jax.Array,
) -> jax.Array:
    """Next token ids [B]: argmax, or temperature -> top-k -> top-p (nucleus) -> categorical."""
    logits_BV = logits_BV.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    V = logits_BV.shape[-1]
    k = V if top_k <= 0 or top_k >= V else top_k
    # top_k first, so the nucleus sort runs over k candidates rather than the whole vocabulary
    vals_BK, idx_BK = jax.lax.top_k(logits_BV / temperature, k)
    probs_BK = jax.nn.softmax(vals_BK, axis=-1)
    before_BK = jnp.cumsum(probs_BK, axis=-1) - probs_BK
    vals_BK = jnp.where(before_BK < top_p, vals_BK, -jnp.inf)  # the top token always survives
    choice_B = jax.random.categorical(key, vals_BK, axis=-1)
    return jnp.take_along_axis(idx_BK, choice_B[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _generate(
    graphdef,
    state,
    ids_BT,
    mask_BT,
    key,
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
    sample = partial(sample_token, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p)
    with jax.named_scope("prefill"):
        # the output layer on the last position only: [B, V], not the prompt's [B, T, V] logits
        h_BTD, cache = model.prefill(ids_BT, mask_BT, cache)
        w_DV = model.output_embedding().astype(h_BTD.dtype)
        logits_BV = model.cap_logits(jnp.einsum("bd,dv->bv", h_BTD[:, -1], w_DV))
        key, sub = jax.random.split(key)
        tok_B = sample(logits_BV, sub)
    params = None
    if per_layer:  # sliced once here, not per layer at every step of the loop (Decoder.layer_params)
        params, cache = model.layer_params(per_layer=True), model.per_layer_cache(cache)
    out_BN = jnp.full((B, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok_B)
    done_B = jnp.isin(tok_B, stop_ids)

    def cond(carry):
        i, _, _, done_B, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done_B)

    def step(carry):
        i, tok_B, cache, done_B, out_BN, key = carry
        with jax.named_scope("decode_step"):
            logits_B1V, cache = model(
                tok_B[:, None], jnp.ones((B, 1), jnp.int32), cache=cache, layer_params=params
            )
            key, sub = jax.random.split(key)
            nxt_B = sample(logits_B1V[:, 0], sub)
            nxt_B = jnp.where(done_B, pad_id, nxt_B)  # finished rows emit padding
            out_BN = jax.lax.dynamic_update_slice(out_BN, nxt_B[:, None], (0, i))
            done_B = done_B | jnp.isin(nxt_B, stop_ids)
        return i + 1, nxt_B, cache, done_B, out_BN, key

    carry = (jnp.int32(1), tok_B, cache, done_B, out_BN, key)
    _, _, _, _, out_BN, _ = jax.lax.while_loop(cond, step, carry)
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
) -> list[list[int]]:
    """Generated token ids per prompt, ending with the stop token that ended it (if any).

    `prompts` are token-id lists, or strings tokenized with the tokenizer's defaults (BOS added);
    use `alignx_jax.data.prompts.prompt_ids` for chat-formatted prompts. `per_layer`: decode over
    per-layer copies of the weights and cache (None: `per_layer_decode`)."""
    if not prompts:
        return []
    if max_new_tokens < 1:
        raise DataError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not greedy and temperature <= 0:
        raise DataError(f"temperature must be > 0 (or use greedy), got {temperature}")
    if isinstance(prompts[0], str):
        if tokenizer is None:
            raise DataError("text prompts need a tokenizer")
        if any(not p.strip() for p in prompts):  # BOS alone would pass the token check below
            raise DataError("empty prompt")
        prompts = [list(tokenizer(p)["input_ids"]) for p in prompts]
    if any(len(p) == 0 for p in prompts):
        raise DataError("empty prompt")
    stops = list(stop_ids) if stop_ids is not None else _stop_ids(model, tokenizer)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = model.cfg.pad_token_id if pad_id is None else pad_id
    pad_id = stops[0] if pad_id is None else int(pad_id)

    B = len(prompts)
    longest = max(len(p) for p in prompts)
    T = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
    ids = np.full((B, T), pad_id, np.int32)
    mask = np.zeros((B, T), np.int32)
    for b, p in enumerate(prompts):  # left padding: every row's last prompt token sits at T-1
        ids[b, T - len(p) :] = p
        mask[b, T - len(p) :] = 1
    graphdef, state = nnx.split(model)
    program = _generate_program(model.cfg.compiler_options_key(decode=True))
    out = program(
        graphdef,
        state,
        jnp.asarray(ids),
        jnp.asarray(mask),
        jax.random.key(seed),
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
    import os

    from alignx_jax.models import checkpoint, hf
    from alignx_jax.real_model import resolve_model_path
    from alignx_jax.sharding import make_mesh
    from alignx_jax.tokenizer import load_tokenizer

    path = resolve_model_path(path)
    kwargs: dict = {"cpu_matmul": cpu_matmul}
    if dtype is not None:
        kwargs["dtype"] = resolve_dtype(dtype)
    if mesh is None and jax.local_device_count() > 1:
        mesh = make_mesh(fsdp=-1, devices=jax.local_devices())
    if os.path.isdir(path) and any(f.endswith(".safetensors") for f in os.listdir(path)):
        model, tok_dir = hf.load_pretrained(path, mesh=mesh, **kwargs), path
    else:
        model, tok_dir = (
            checkpoint.load_checkpoint(path, mesh=mesh, **kwargs),
            checkpoint.resolve_checkpoint(path).tokenizer_dir,
        )
    if tok_dir is None:
        raise CheckpointError(f"{path}: no tokenizer files next to the model")
    return model, load_tokenizer(tok_dir)


def _prompt_budget(ids: list[int], fmt: str, max_length: int) -> list[int]:
    """Left-truncate a prompt to `max_length - reserve` tokens as the release evaluates; the `paper`
    format's BOS is kept in front of the truncated prompt string."""
    from alignx_jax.data.batching import reserve

    budget = max_length - reserve(max_length)
    if fmt == "paper":
        return ids[:1] + ids[1:][-budget:]
    return ids[-budget:]


def _generate_benchmark(args) -> int:
    """`alignx generate --benchmark NAME=PATH --out FILE.jsonl`: one line per row (benchmark, index, id,
    method, prompt_format, prompt, output), appended batch by batch; a rerun skips the rows already in
    FILE (a cut last line is dropped), so an interrupted run resumes."""
    import os

    from tqdm.auto import tqdm

    from alignx_jax.data import prompts as prompts_lib
    from alignx_jax.data import schema
    from alignx_jax.data.benchmarks import balanced_sample, parse_benchmark_arg, persona_group
    from alignx_jax.errors import ConfigError
    from alignx_jax.evaluate import PerExampleLog, default_prompt_format

    if args.prompt:
        raise ConfigError("give --prompt or --benchmark, not both")
    if args.persona:
        raise ConfigError("--persona applies to --prompt; a benchmark row carries its own persona")
    if not getattr(args, "out", None):
        raise ConfigError("--benchmark needs --out FILE.jsonl")
    limit, batch_size = getattr(args, "limit", None), int(getattr(args, "batch_size", 8))
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be positive, got {limit}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}")
    name, path = parse_benchmark_arg(args.benchmark)
    if not os.path.exists(path):
        raise DataError(f"--benchmark {name}: no such file or folder", file=path)
    rows, _ = schema.load_rows(path, kind=name)
    if not rows:
        raise DataError("benchmark holds no rows", file=path)
    picks = list(range(len(rows))) if limit is None else balanced_sample(rows, limit)  # eval --limit's rows
    fmt = default_prompt_format(args.model, getattr(args, "prompt_format", None), fallback="paper")
    max_length = int(getattr(args, "max_length", 8192))
    # a multi-process job: every process generates on its own devices, process 0 alone writes
    main = paths.is_main_process()
    log = PerExampleLog.for_job(args.out, flag="--out")
    try:
        todo = []
        for i in picks:
            done = log.get((name, None, i))
            if done is None:
                todo.append(i)
            elif (done.get("method"), done.get("prompt_format")) != (args.method, fmt):
                raise DataError(
                    f"row {i} was generated with --method {done.get('method')} and prompt format "
                    f"{done.get('prompt_format')}; use a new --out file",
                    file=args.out,
                )
        if not todo:
            if main:
                print(f"{args.out}: all {len(picks)} rows already generated", file=sys.stderr)
            return 0
        model, tokenizer = load_model_and_tokenizer(
            args.model, getattr(args, "dtype", None), cpu_matmul=getattr(args, "cpu_matmul", "auto")
        )
        ids = {
            i: _prompt_budget(
                prompts_lib.prompt_ids(tokenizer, rows[i], method=args.method, fmt=fmt), fmt, max_length
            )
            for i in todo
        }
        todo.sort(key=lambda i: (-len(ids[i]), i))  # similar lengths batch together: less padding
        with tqdm(total=len(todo), desc=f"generate {name}", unit="row", disable=not main) as bar:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                # a seed per batch from its rows: a resumed run draws what an uninterrupted one would
                seed = int(np.random.SeedSequence([int(args.seed), *batch]).generate_state(1)[0] >> 1)
                outs = generate(
                    model,
                    tokenizer,
                    [ids[i] for i in batch],
                    max_new_tokens=args.max_new_tokens,
                    greedy=args.greedy,
                    temperature=args.temperature,
                    top_k=args.top_k,
                    top_p=args.top_p,
                    seed=seed,
                )
                log.append(
                    {
                        "benchmark": name,
                        "persona": None,
                        "index": i,
                        "id": rows[i].get("id", i),
                        "group": persona_group(rows[i]),
                        "method": args.method,
                        "prompt_format": fmt,
                        "prompt": rows[i]["prompt"],
                        "output": tokenizer.decode(toks, skip_special_tokens=True),
                    }
                    for i, toks in zip(batch, outs)
                )
                bar.update(len(batch))
    finally:
        log.close()
    if main:
        print(f"{args.out}: {len(todo)} rows generated, {len(picks)} in all")
    return 0


def cli_generate(args) -> int:
    if getattr(args, "benchmark", None):
        return _generate_benchmark(args)
    if not args.prompt:
        raise DataError("give --prompt TEXT (repeatable), or --benchmark NAME=PATH with --out FILE.jsonl")
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
    model, tokenizer = load_model_and_tokenizer(
        args.model, getattr(args, "dtype", None), cpu_matmul=getattr(args, "cpu_matmul", "auto")
    )
    try:
        from alignx_jax.data import prompts as prompts_lib
    except ImportError as e:  # pragma: no cover - the data package ships with the project
        raise AlignXError(f"prompt rendering unavailable ({e})") from e
    from alignx_jax.evaluate import default_prompt_format

    fmt = default_prompt_format(args.model, getattr(args, "prompt_format", None), fallback="chat")
    prompt_ids = [
        _prompt_budget(
            prompts_lib.prompt_ids(tokenizer, {**persona, "prompt": text}, method=args.method, fmt=fmt),
            fmt,
            int(getattr(args, "max_length", 8192)),
        )
        for text in args.prompt
    ]
    outs = generate(
        model,
        tokenizer,
        prompt_ids,
        max_new_tokens=args.max_new_tokens,
        greedy=args.greedy,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
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
