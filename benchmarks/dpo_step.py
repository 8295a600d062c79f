"""One full DPO training step, JAX (alignx_jax.train's jitted step) vs PyTorch/transformers.

    python benchmarks/dpo_step.py [--model-size S] [--seq-len L] [--batch B] [--device cpu|gpu] --json OUT.json

Both sides train the same Llama-style model from the same weights on the same batch of B pairs
(2B sequences of L tokens, chosen rows first, right-padded), with a separately initialised frozen
reference model (so the first-step loss is not trivially log 2 and the check compares real
log-probs). A step is: policy forward+backward on chosen and rejected, reference forward, sigmoid
DPO loss (beta 0.1), global-norm clip 1.0, AdamW (constant lr).

* JAX: `alignx_jax.train.step.make_train_step` (the code `alignx train` jits), jitted with the
  parameters and optimizer state donated, batch in the train layout `[1, B, 2, L]` with the
  response window `alignx train` adds by default (`loss.logits_on_responses`: the output layer
  runs on each row's response positions only; `--full-logits` turns it off) and its token
  compaction (`data.compact_tokens`: norms, projections and MLP run on the real tokens only,
  attention on the padded rows; `--no-compact` turns it off).
  `--layout shared_prompt` (the default with `--pairs psoups`, as configs/demo_real.py trains
  P-SOUPS) hands it `data.share_prompt`'s one row per pair instead: each prompt runs once, not twice;
  tokens/s still counts the pairs' tokens, `cpu_mfu` the tokens the step computes
  (`jax_tokens_computed_per_step`), `cpu_mfu_pair_tokens` the pairs' tokens.
* PyTorch: a TRL-style step written with torch: `LlamaForCausalLM` (sdpa attention), one
  forward over the concatenated chosen+rejected batch, float32 `log_softmax` + gather, masked sum,
  sigmoid DPO, `clip_grad_norm_`, `torch.optim.AdamW`. `torch.compile` of the same loss function
  (forward+backward through AOTAutograd/inductor) is timed too.

After one step of each alone (the compiles) and `--warmup` untimed rounds of all of them in the
timed order (`warm_round_seconds`), the JAX step, the torch step, the compiled torch step and a peak
matmul are timed in turn, one each per round, for `--steps` rounds (so load changes on a shared
machine hit all of them alike); the reported times are medians over rounds. tokens/s
counts the batch's real tokens (`tokens_per_step`; `positions_per_step` = 2 * B * L counts the padding
too: both sides are handed the same padded tensor, and the ratio is the same either way).
`model_flops_per_step` counts the real tokens' matmul FLOPs (the useful work; padding is not):
6 N_mm + attention for the policy (forward+backward)
and 2 N_mm + attention for the reference forward, where N_mm excludes the embedding gather and
attention is 4 L_layers T D_attn per token (full, un-halved score matrix, as computed here).
`peak_flops` is the median over rounds of the best square JAX matmul rate in `--dtype`
(1024^2 / 2048^2 on a CPU, 4096^2 / 8192^2 on a GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.join(ROOT, "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import _smollm2 as common  # noqa: E402  (the machine description every benchmark reports)

from alignx_jax import allocator, hardware, metrics  # noqa: E402

BETA = 0.1
LR = 1e-4

# Llama-style sizes (HF config names). "default" is ~36M parameters.
SIZES: dict[str, dict[str, int]] = {
    # `make demo`'s model (configs/demo_cpu.py with the shipped 4096-word tokenizer)
    "demo": dict(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        vocab_size=4096,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=512,
    ),
    "xs": dict(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=8192,
    ),
    "s": dict(
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=8192,
    ),
    "default": dict(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        vocab_size=16384,
    ),
    "m": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=6,
        num_attention_heads=12,
        num_key_value_heads=4,
        head_dim=64,
        vocab_size=16384,
    ),
    # SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M-Instruct), ~135M parameters; see SIZE_EXTRA
    "smollm2": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
    ),
    # Llama-3.2-1B's shape, ~1.24B parameters: the 1B-class step of the GPU measurements
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
    ),
}
# non-integer config keys per size (the others: untied, rope theta 1e4)
SIZE_EXTRA: dict[str, dict[str, Any]] = {
    "smollm2": dict(tie_word_embeddings=True, rope_theta=100000.0),
    "1b": dict(tie_word_embeddings=True, rope_theta=500000.0),
}
# P-SOUPS-like pairs: (prompt, response) token counts around which `--pairs psoups` draws
PSOUPS_LENGTHS = (250, 50)


@dataclasses.dataclass
class Setup:
    hf_config: dict[str, Any]
    seq_len: int
    batch: int  # pairs
    data: dict[str, np.ndarray]  # collated DPO batch, 2B rows (chosen first)


def make_setup(size: str, seq_len: int, batch: int, seed: int = 0, pairs: str = "fixed") -> Setup:
    """The model description and a synthetic right-padded DPO batch (ARCHITECTURE.md layout).

    `pairs="psoups"`: P-SOUPS-like pairs instead (prompt ~250 tokens, responses ~50 + EOS, drawn
    +-15% / +-40%), collated by `data.batching.collate` into its length bucket (`seq_len` ignored)."""
    if size not in SIZES:
        raise SystemExit(f"unknown --model-size {size!r}; one of {', '.join(SIZES)}")
    common.check_counts(batch=batch)
    if pairs == "fixed":  # a prompt token, a response token and the closing EOS
        common.check_counts(3, seq_len=seq_len)
    hf = dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=max(2048, seq_len),
        tie_word_embeddings=False,
        hidden_act="silu",
        attention_bias=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **SIZES[size],
    )
    hf.update(SIZE_EXTRA.get(size, {}))
    if pairs == "psoups":
        return _psoups_setup(hf, batch, seed)
    rng = np.random.default_rng(seed)
    n, T, V = 2 * batch, seq_len, hf["vocab_size"]
    ids = rng.integers(3, V, size=(n, T), dtype=np.int32)
    attn = np.zeros((n, T), np.int32)
    loss = np.zeros((n, T), np.int32)
    prompt = max(1, T // 4)
    for i in range(n):  # real length in [3T/4, T]: some right padding, as a length bucket has
        length = int(rng.integers(max(prompt + 2, (3 * T) // 4), T + 1))
        attn[i, :length] = 1
        loss[i, prompt:length] = 1
        ids[i, length - 1] = 2  # closing EOS, scored
        ids[i, length:] = 0
    # chosen and rejected share their prompt, as in real pairs
    ids[batch:, :prompt] = ids[:batch, :prompt]
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (n, T)).copy()
    data = {
        "input_ids": ids,
        "attention_mask": attn,
        "loss_mask": loss,
        "positions": positions,
        "pair_mask": np.ones((batch,), np.int32),
    }
    return Setup(hf, seq_len, batch, data)


def _psoups_setup(hf: dict[str, Any], batch: int, seed: int) -> Setup:
    from alignx_jax.data.batching import DPOExample, collate
    from alignx_jax.evaluate import length_buckets

    rng = np.random.default_rng(seed)
    P, R = PSOUPS_LENGTHS
    V = hf["vocab_size"]
    ids = lambda k: rng.integers(3, V, size=k).tolist()
    examples = []
    for i in range(batch):
        p = int(rng.integers(int(P * 0.85), int(P * 1.15) + 1))
        c, r = (int(rng.integers(int(R * 0.6), int(R * 1.4) + 1)) for _ in range(2))
        examples.append(DPOExample([1] + ids(p - 1), ids(c - 1) + [2], ids(r - 1) + [2], index=i))
    longest = max(ex.length for ex in examples)
    data = collate(examples, buckets=length_buckets(longest), pad_id=0)
    data = {k: data[k] for k in ("input_ids", "attention_mask", "loss_mask", "positions", "pair_mask")}
    hf["max_position_embeddings"] = max(hf["max_position_embeddings"], data["input_ids"].shape[1])
    return Setup(hf, int(data["input_ids"].shape[1]), batch, data)


def param_counts(hf: dict[str, Any]) -> tuple[int, int]:
    """(total parameters, parameters in matmuls excluding the embedding gather)."""
    D, F, L = hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"]
    N, K, H, V = hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"], hf["vocab_size"]
    per_layer = D * N * H * 2 + D * K * H * 2 + 3 * D * F
    mm = L * per_layer + D * V
    embed = 0 if hf.get("tie_word_embeddings") else V * D  # tied: the output layer is the embedding
    return mm + embed + (2 * L + 1) * D, mm


def model_flops_per_step(hf: dict[str, int], seq_len: int, batch: int, tokens: int | None = None) -> float:
    """Matmul FLOPs of one step over `tokens` tokens (default every position, 2 * batch * seq_len)."""
    _, mm = param_counts(hf)
    tokens = 2 * batch * seq_len if tokens is None else int(tokens)
    attn_fwd_per_token = 4 * hf["num_hidden_layers"] * seq_len * hf["num_attention_heads"] * hf["head_dim"]
    fwd = (2 * mm + attn_fwd_per_token) * tokens
    return float(4 * fwd)  # policy forward + backward (3x) + reference forward (1x)


# ----------------------------------------------------------------------------- JAX


def jax_models(
    setup: Setup,
    dtype: str = "float32",
    *,
    scan_layers: bool = True,
    remat: str = "none",
    attention_impl: str = "xla",
    cpu_matmul: str = "auto",
):
    """(policy Decoder, reference Decoder) with seeds 0 and 1; the run options are the config's
    `model.scan_layers`, `model.remat`, `model.attention_impl` and `model.cpu_matmul`."""
    from flax import nnx

    from alignx_jax.models.decoder import Decoder, DecoderConfig

    dcfg = DecoderConfig.from_hf(
        setup.hf_config,
        dtype=dtype,
        param_dtype="float32",
        remat=remat,
        scan_layers=scan_layers,
        attention_impl=attention_impl,
        cpu_matmul=cpu_matmul,
    )
    return Decoder(dcfg, rngs=nnx.Rngs(0)), Decoder(dcfg, rngs=nnx.Rngs(1))


def _loss_cfg(chunk: int):
    """The schema's `loss` section (sigmoid DPO, reference on the fly) at BETA and time chunk `chunk`."""
    from alignx_jax import config_schema

    c = config_schema.default_config().loss
    c.update(beta=BETA, logps_chunk=chunk)
    return c


def _optim_cfg():
    import ml_collections

    return ml_collections.ConfigDict(
        dict(lr=LR, warmup_ratio=0.0, min_lr_ratio=1.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, clip=1.0)
    )


class JaxStep:
    """The `train.step` step, jitted as `alignx train` does (params and optimizer state donated)."""

    def __init__(
        self,
        policy,
        reference,
        setup: Setup,
        chunk: int = 0,
        response_logits: bool = True,
        compact: bool = True,
        compiler_options: dict[str, Any] | None = None,
        data: dict[str, np.ndarray] | None = None,
    ):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from alignx_jax.batch import to_microbatches
        from alignx_jax.train.state import ParamsCodec, make_optimizer
        from alignx_jax.train.step import make_train_step

        self.codec = ParamsCodec.of(policy)
        self.params = nnx.to_pure_dict(nnx.state(policy))
        ref = nnx.to_pure_dict(nnx.state(reference))
        self.ref_params = jax.tree.map(lambda x: jnp.array(x, dtype=policy.cfg.compute_dtype, copy=True), ref)
        self.tx, _ = make_optimizer(_optim_cfg(), total_steps=1000)
        self.opt_state = self.tx.init(self.params)
        step = make_train_step(self.codec, self.tx, _loss_cfg(chunk), precomputed=False)
        # as `alignx train` lays a batch out: with loss.logits_on_responses (the default) the output
        # layer runs only on each row's response window (`score_index`), not on prompt positions
        window = 0 if response_logits else None
        # and with data.compact_tokens (the default) the token-wise layers skip the padding
        tokens = (1, 0) if compact else None
        # `data`: the host batch in the layout to run (`jax_layout`); None: the collated two rows
        data = setup.data if data is None else data
        self.batch = jax.device_put(to_microbatches(data, 1, window=window, tokens=tokens))
        self.jitted = jax.jit(step, donate_argnums=(0, 1))
        lowered = self.jitted.lower(self.params, self.opt_state, self.ref_params, self.batch)
        # None: the model's own options, as `alignx train` compiles it (model.cpu_matmul); {}: XLA's defaults
        if compiler_options is None:
            compiler_options = self.codec.compiler_options
        t0 = time.perf_counter()
        self.compiled = lowered.compile(compiler_options=compiler_options)
        self.compile_seconds = time.perf_counter() - t0

    def __call__(self) -> float:
        self.params, self.opt_state, m = self.compiled(
            self.params, self.opt_state, self.ref_params, self.batch
        )
        return float(m["loss"])  # blocks until the step is done

    def peak_memory_bytes(self) -> int:
        ma = self.compiled.memory_analysis()
        return int(
            ma.argument_size_in_bytes
            + ma.output_size_in_bytes
            - ma.alias_size_in_bytes
            + ma.temp_size_in_bytes
        )


def jax_layout(setup: Setup, share_prompt: bool) -> dict[str, np.ndarray]:
    """The batch the JAX step is handed: the collated two rows per pair, or with `share_prompt` one row
    per pair (prompt, chosen, rejected; `data.share_prompt=true`), padded to the same kind of bucket."""
    if not share_prompt:
        return setup.data
    from alignx_jax.data import batching
    from alignx_jax.evaluate import length_buckets

    # a prompt and two responses fit in twice a row; share_prompt takes the smallest bucket that holds them
    return batching.share_prompt(setup.data, buckets=length_buckets(2 * setup.seq_len), pad_id=0)


def jax_logps(policy, setup: Setup) -> np.ndarray:
    """Summed response log-probs `[2B]` (chosen rows first) through `train.step.pair_logps`."""
    import jax
    from flax import nnx

    from alignx_jax.batch import to_microbatches
    from alignx_jax.train.state import ParamsCodec
    from alignx_jax.train.step import pair_logps

    codec = ParamsCodec.of(policy)
    mb = to_microbatches(setup.data, 1).microbatch(0)
    lp = jax.jit(lambda p, b: pair_logps(codec, p, b, None))(nnx.to_pure_dict(nnx.state(policy)), mb)
    lp = np.asarray(lp)
    return np.concatenate([lp[:, 0], lp[:, 1]])


def measure_peak_flops(dtype: str = "float32", repeats: int = 5) -> float:
    """Best FLOP/s of a square matmul in JAX on the default device: 1024^2 and 2048^2 on a CPU,
    4096^2 and 8192^2 on an accelerator (where a 2048^2 product is over before its launch cost is)."""
    import jax

    best = 0.0
    for n in (1024, 2048) if jax.default_backend() == "cpu" else (4096, 8192):
        a = jax.random.normal(jax.random.key(0), (n, n), dtype)
        b = jax.random.normal(jax.random.key(1), (n, n), dtype)
        # a float32 result: bf16 x bf16 -> bf16 takes XLA's slow upcast path on CPU (models/matmul.py)
        f = jax.jit(lambda x, y: jax.numpy.dot(x, y, preferred_element_type="float32"))
        f(a, b).block_until_ready()
        for _ in range(repeats):
            t0 = time.perf_counter()
            f(a, b).block_until_ready()
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


# ----------------------------------------------------------------------------- PyTorch


def torch_models(policy, reference, device: str = "cpu"):
    """LlamaForCausalLM copies of the JAX policy and reference (same weights, float32)."""
    import torch
    from flax import nnx
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignx_jax.models.hf import param_maps

    def convert(model):
        cfg = model.cfg
        flat = dict(nnx.to_flat_state(nnx.state(model)))
        sd = {}
        for m in param_maps(cfg):
            arr = np.asarray(flat[m.path].get_value(), np.float32)
            if m.layered:
                for i in range(cfg.num_hidden_layers):
                    sd[m.hf_name.format(i=i)] = torch.from_numpy(
                        np.array(m.to_hf(arr[i], cfg), np.float32, copy=True)
                    )
            else:
                sd[m.hf_name] = torch.from_numpy(np.array(m.to_hf(arr, cfg), np.float32, copy=True))
        hf_cfg = {k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "model_type")}
        tm = LlamaForCausalLM(LlamaConfig(**hf_cfg, attn_implementation="sdpa"))
        missing, unexpected = tm.load_state_dict(sd, strict=False)
        missing = [
            k
            for k in missing
            if "rotary" not in k and not (k == "lm_head.weight" and cfg.tie_word_embeddings)
        ]
        if missing or unexpected:
            raise RuntimeError(f"weight copy mismatch: missing {missing}, unexpected {unexpected}")
        return tm.to(device=device, dtype=torch.float32)

    pol, ref = convert(policy), convert(reference)
    ref.eval().requires_grad_(False)
    pol.train()
    return pol, ref


def torch_batch(setup: Setup, device: str = "cpu") -> dict[str, Any]:
    import torch

    return {
        k: torch.from_numpy(setup.data[k].astype(np.int64)).to(device)
        for k in ("input_ids", "attention_mask", "loss_mask", "positions")
    }


def torch_seq_logps(model, b: dict[str, Any]):
    """TRL-style: logits of the concatenated batch, float32 log_softmax, gather, masked sum -> [2B]."""
    import torch

    logits = model(
        input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["positions"]
    ).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tok = torch.gather(logp, 2, b["input_ids"][:, 1:, None]).squeeze(2)
    return (tok * b["loss_mask"][:, 1:]).sum(-1)


def torch_dpo_loss(policy, reference, b: dict[str, Any]):
    import torch
    import torch.nn.functional as F

    n = b["input_ids"].shape[0] // 2
    pol = torch_seq_logps(policy, b)
    with torch.no_grad():
        ref = torch_seq_logps(reference, b)
    logits = (pol[:n] - pol[n:]) - (ref[:n] - ref[n:])
    return -F.logsigmoid(BETA * logits).mean()


class TorchStep:
    def __init__(
        self,
        policy,
        reference,
        setup: Setup,
        device: str = "cpu",
        compiled: bool = False,
        dtype: str = "float32",
    ):
        import torch

        self.policy, self.reference = policy, reference
        # --dtype bfloat16: torch's mixed precision (float32 weights and optimizer, bf16 autocast
        # compute), as the JAX side's model.dtype=bfloat16 with float32 parameters
        self.autocast = dtype != "float32"
        self.b = torch_batch(setup, device)
        self.opt = torch.optim.AdamW(
            policy.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0
        )
        self.loss_fn = torch.compile(torch_dpo_loss) if compiled else torch_dpo_loss
        self.device = device

    def __call__(self) -> float:
        import torch

        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.loss_fn(self.policy, self.reference, self.b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        out = float(loss.detach())
        if self.device != "cpu":
            torch.cuda.synchronize()
        return out


# ----------------------------------------------------------------------------- driver


def time_steps(step, warmup: int, steps: int) -> tuple[list[float], list[float]]:
    losses, times = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        losses.append(step())
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
    return losses, times


def _timed(step) -> tuple[float, float, dict[str, float]]:
    """(loss, seconds, the process's page faults and kernel CPU seconds during the step)."""
    r0, t0 = metrics.host_usage(), time.perf_counter()
    loss = step()
    return loss, time.perf_counter() - t0, metrics.host_costs(r0)


def interleaved_rounds(steps: dict[str, Any], rounds: int, peak=None) -> dict[str, Any]:
    """Time one step of every contender per round, in turn, `rounds` times (plus one peak-matmul
    measurement per round when `peak` is given): a load change on the shared machine then hits all
    of them alike, and per-round ratios stay meaningful even when absolute times drift. Each step's
    page faults and kernel time are kept too: memory one contender hands back to the OS and the
    next one faults in again is paid inside the step (BENCHMARKS.md §9)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    losses: dict[str, list[float]] = {name: [] for name in steps}
    os_costs: dict[str, dict[str, list[float]]] = {name: {} for name in steps}
    if peak is not None:
        times["peak_flops"] = []
    for _ in range(rounds):
        for name, step in steps.items():
            loss, dt, cost = _timed(step)
            losses[name].append(loss)
            times[name].append(dt)
            for k, v in cost.items():
                os_costs[name].setdefault(k, []).append(v)
        if peak is not None:
            times["peak_flops"].append(peak())
    return {"times": times, "losses": losses, "os_costs": os_costs}


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    else:  # torch shares the GPU: JAX takes memory as it needs it, not 75% of the card up front
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import copy

    import jax
    import torch

    torch.manual_seed(0)
    torch_device = "cpu" if args.device == "cpu" else "cuda"
    if args.device == "gpu" and (jax.default_backend() != "gpu" or not torch.cuda.is_available()):
        # JAX falls back to the CPU without a word, and torch's first .to("cuda") fails in a traceback
        raise SystemExit(
            f"--device gpu: JAX or torch sees no GPU (JAX's backend: {jax.default_backend()}, torch.cuda.is_available(): "
            f"{torch.cuda.is_available()}); leave --device out to run on the CPU"
        )
    setup = make_setup(args.model_size, args.seq_len, args.batch, seed=args.seed, pairs=args.pairs)
    args.seq_len = setup.seq_len  # --pairs psoups: the collated length bucket
    positions = 2 * args.batch * args.seq_len
    tokens = int(np.asarray(setup.data["attention_mask"]).sum())  # real tokens: what tokens/s and MFU count
    flops = model_flops_per_step(setup.hf_config, args.seq_len, args.batch, tokens)
    flops_positions = model_flops_per_step(setup.hf_config, args.seq_len, args.batch)
    # the JAX side's layout: `auto` is what the shipped recipe for such pairs trains with (P-SOUPS:
    # configs/demo_real.py's data.share_prompt=true; the fixed rows: the schema default, two rows)
    share = args.layout == "shared_prompt" or (args.layout == "auto" and args.pairs == "psoups")
    jax_data = jax_layout(setup, share)
    # what the JAX step computes: with a shared prompt each pair's prompt once, so fewer tokens than the
    # pairs hold; its MFU counts these (the hardware's work), tokens/s the pairs' tokens (the user's work)
    # (with two rows these equal `tokens`, `positions`, `flops` and `flops_positions`)
    jax_tokens = int(np.asarray(jax_data["attention_mask"]).sum())
    jax_len = int(jax_data["input_ids"].shape[1])
    jax_positions = int(jax_data["input_ids"].size)
    jax_flops = model_flops_per_step(setup.hf_config, jax_len, 1, jax_tokens)
    jax_flops_positions = model_flops_per_step(setup.hf_config, jax_len, 1, jax_positions)
    out: dict[str, Any] = {
        "model_size": args.model_size,
        "dtype": args.dtype,
        "model_shape": {k: v for k, v in setup.hf_config.items() if k not in ("architectures", "model_type")},
        "pairs": args.pairs,
        "seq_len": args.seq_len,
        "batch_pairs": args.batch,
        "scan_layers": args.scan_layers,
        "remat": args.remat,
        "attention_impl": args.attention_impl,
        "cpu_matmul": args.cpu_matmul,
        "tokens_per_step": tokens,
        "jax_layout": "shared_prompt" if share else "two_rows",
        "jax_tokens_computed_per_step": jax_tokens,
        "jax_positions_per_step": jax_positions,
        "jax_model_flops_per_step": jax_flops,
        "positions_per_step": positions,
        "jax_logits_on_responses": args.response_logits,
        "jax_compact_tokens": args.compact,
        "params": param_counts(setup.hf_config)[0],
        "model_flops_per_step": flops,
        "model_flops_per_step_all_positions": flops_positions,
        "device": args.device,
        "logps_chunk": args.chunk,
        "jax_version": jax.__version__,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "machine": common.cpu_model(),
        "cpu": common.cpu_features(),
        "allocator": allocator.active(),
        "cpu_count": os.cpu_count(),
        "timing": "interleaved rounds, medians",
        "load_average_start": list(os.getloadavg()),
    }
    policy, reference = jax_models(
        setup,
        args.dtype,
        scan_layers=args.scan_layers,
        remat=args.remat,
        attention_impl=args.attention_impl,
        cpu_matmul=args.cpu_matmul,
    )
    # what model.cpu_matmul resolved to on this machine ('' off the CPU)
    out["cpu_matmul_library"] = hardware.cpu_matmul_library(
        args.cpu_matmul, args.dtype, setup.hf_config["hidden_size"]
    )
    # torch copies first: the JAX step donates (invalidates) the policy's buffers
    t_pol, t_ref = torch_models(policy, reference, torch_device)
    c_pol = copy.deepcopy(t_pol) if args.compile else None  # torch.compile trains its own copy

    t0 = time.perf_counter()
    jstep = JaxStep(
        policy,
        reference,
        setup,
        chunk=args.chunk,
        response_logits=args.response_logits,
        compact=args.compact,
        data=jax_data,
    )
    out["jax_compile_seconds"] = time.perf_counter() - t0
    out["jax_peak_memory_bytes"] = jstep.peak_memory_bytes()
    del policy, reference
    contenders: dict[str, Any] = {
        "jax": jstep,
        "torch": TorchStep(t_pol, t_ref, setup, torch_device, dtype=args.dtype),
    }
    if args.compile:
        contenders["torch_compiled"] = TorchStep(
            c_pol, t_ref, setup, torch_device, compiled=True, dtype=args.dtype
        )

    # warm-up: each contender's first step alone (its compile), then --warmup untimed rounds in the timed
    # order: the contenders share the process's allocator, and one's step after the others' can grow it
    # (huge pages faulted in with compaction) until the interleaving reaches its steady state (BENCHMARKS.md §9)
    warm_losses: dict[str, list[float]] = {name: [] for name in contenders}
    for name, step in contenders.items():
        loss, dt, _ = _timed(step)
        warm_losses[name].append(loss)
        if name == "torch_compiled":
            out["torch_compile_seconds"] = dt
    measure_peak_flops(args.dtype, repeats=1)  # compile the matmuls outside the timed rounds

    def peak() -> float:
        return measure_peak_flops(args.dtype, repeats=2)

    try:
        warm = interleaved_rounds(contenders, args.warmup, peak=peak)
        for name in contenders:
            warm_losses[name] += warm["losses"][name]
        out["warm_round_seconds"] = {k: v for k, v in warm["times"].items() if k != "peak_flops"}
        res = interleaved_rounds(contenders, args.steps, peak=peak)
    except Exception as e:  # inductor needs a working C++ toolchain; report, do not crash
        if "torch_compiled" not in contenders:
            raise
        out["torch_compiled_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        contenders.pop("torch_compiled")
        res = interleaved_rounds(contenders, args.steps, peak=peak)
    times, losses = res["times"], res["losses"]
    all_losses = {k: warm_losses[k] + losses[k] for k in contenders}

    med = statistics.median
    out.update(
        jax_loss=all_losses["jax"][0],
        torch_loss=all_losses["torch"][0],
        jax_loss_step2=all_losses["jax"][1] if len(all_losses["jax"]) > 1 else None,
        torch_loss_step2=all_losses["torch"][1] if len(all_losses["torch"]) > 1 else None,
        loss_abs_diff=abs(all_losses["jax"][0] - all_losses["torch"][0]),
        jax_step_seconds=med(times["jax"]),
        torch_step_seconds=med(times["torch"]),
        jax_step_times=times["jax"],
        torch_step_times=times["torch"],
        peak_flops_rounds=times["peak_flops"],
        # per contender, per round: minor page faults and kernel CPU seconds of its step
        os_costs_per_step=res["os_costs"],
    )
    out["jax_tokens_per_sec"] = tokens / out["jax_step_seconds"]
    out["torch_tokens_per_sec"] = tokens / out["torch_step_seconds"]
    out["torch_compiled_tokens_per_sec"] = None
    if "torch_compiled" in contenders:
        out["torch_compiled_loss"] = all_losses["torch_compiled"][0]
        out["torch_compiled_step_seconds"] = med(times["torch_compiled"])
        out["torch_compiled_step_times"] = times["torch_compiled"]
        out["torch_compiled_tokens_per_sec"] = tokens / out["torch_compiled_step_seconds"]
        out["jax_vs_torch_compiled"] = out["jax_tokens_per_sec"] / out["torch_compiled_tokens_per_sec"]
        out["jax_vs_torch_compiled_per_round"] = [
            t / j for j, t in zip(times["jax"], times["torch_compiled"])
        ]

    # peak: median over the rounds of each round's best matmul rate (measured beside the steps)
    out["peak_flops"] = med(times["peak_flops"])
    mfu_key = "cpu_mfu" if args.device == "cpu" else "gpu_mfu"
    out[mfu_key] = jax_flops / out["jax_step_seconds"] / out["peak_flops"]
    out["torch_mfu"] = flops / out["torch_step_seconds"] / out["peak_flops"]
    # the same with padded positions counted as work (the definition of the earlier BENCHMARKS rows)
    out[mfu_key + "_all_positions"] = jax_flops_positions / out["jax_step_seconds"] / out["peak_flops"]
    out["torch_mfu_all_positions"] = flops_positions / out["torch_step_seconds"] / out["peak_flops"]
    out["jax_vs_torch"] = out["jax_tokens_per_sec"] / out["torch_tokens_per_sec"]
    # per-round ratios: robust to load drifting between rounds
    out["jax_vs_torch_per_round"] = [t / j for j, t in zip(times["jax"], times["torch"])]
    out[mfu_key + "_per_round"] = [jax_flops / j / pk for j, pk in zip(times["jax"], times["peak_flops"])]
    # the pairs' model FLOPs over the JAX step's time: above cpu_mfu by what the shared prompt saves
    out[mfu_key + "_pair_tokens"] = flops / out["jax_step_seconds"] / out["peak_flops"]
    out["load_average_end"] = list(os.getloadavg())
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-size", default="default", choices=sorted(SIZES))
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument(
        "--pairs",
        default="fixed",
        choices=["fixed", "psoups"],
        help="fixed: 2B rows of --seq-len (prompt L/4, length 3L/4..L); psoups: prompt ~250, responses ~50",
    )
    p.add_argument("--batch", type=int, default=4, help="pairs per step (2x sequences)")
    p.add_argument(
        "--layout",
        default="auto",
        choices=["auto", "two_rows", "shared_prompt"],
        help="JAX batch layout: two rows per pair as the torch side, or one row per pair with the prompt "
        "once (data.share_prompt=true); auto: shared_prompt for --pairs psoups (configs/demo_real.py's "
        "recipe), two_rows otherwise (the schema default)",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="compute dtype of both sides (parameters and optimizer stay float32; torch: autocast); "
        "the peak matmul is measured in it",
    )
    p.add_argument(
        "--steps",
        "--rounds",
        dest="steps",
        type=int,
        default=5,
        help="timed rounds; each times one step of every contender plus the peak matmul (medians reported)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed rounds of all contenders after each one's first (compiling) step",
    )
    p.add_argument("--chunk", type=int, default=0, help="loss.logps_chunk for the JAX step (0 = one chunk)")
    p.add_argument("--scan-layers", type=int, default=1, help="model.scan_layers of the JAX model (1/0)")
    p.add_argument("--remat", default="none", help="model.remat of the JAX model")
    p.add_argument("--attention-impl", default="xla", help="model.attention_impl of the JAX model")
    p.add_argument(
        "--cpu-matmul",
        default="auto",
        choices=["auto", "ynnpack", "onednn"],
        help="model.cpu_matmul of the JAX model: the library XLA's CPU backend calls for products",
    )
    p.add_argument(
        "--full-logits",
        dest="response_logits",
        action="store_false",
        help="JAX: logits on every position (loss.logits_on_responses=False), as the torch side does",
    )
    p.add_argument(
        "--no-compact",
        dest="compact",
        action="store_false",
        help="JAX: token-wise layers on every position, padding included (data.compact_tokens=0)",
    )
    p.add_argument(
        "--no-compile", dest="compile", action="store_false", help="skip the torch.compile variant"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="OUT.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.check_counts(batch=args.batch, steps=args.steps)
    if args.warmup < 0:
        raise SystemExit(f"--warmup must be >= 0, got {args.warmup}")
    common.check_json_out(args.json)
    out = run(args)
    if args.json:
        common.write_json_out(args.json, out)
    keys = (
        "jax_layout",
        "jax_tokens_per_sec",
        "torch_tokens_per_sec",
        "torch_compiled_tokens_per_sec",
        "jax_vs_torch",
        "jax_vs_torch_compiled",
        "cpu_mfu",
        "gpu_mfu",
        "peak_flops",
        "jax_loss",
        "torch_loss",
        "jax_peak_memory_bytes",
        "load_average_start",
        "load_average_end",
    )
    print(json.dumps({k: out[k] for k in keys if k in out}, indent=2))
    return 0


if __name__ == "__main__":
    common.preload_allocator()  # before JAX starts
    sys.exit(main())
