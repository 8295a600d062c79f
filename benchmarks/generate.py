"""Generation throughput: `alignx generate`'s KV-cached greedy decoding vs transformers `generate`.

    python benchmarks/generate.py [--shape smollm2|tiny] [--real] [--batch 8] [--prompt-len 250] \
        [--new-tokens 128] [--rounds 3] [--torch-attn sdpa|eager] --json OUT.json

Both sides load one HF folder (random float32 weights at SmolLM2-135M's shape written by
`LlamaForCausalLM(LlamaConfig(...))`, or the real SmolLM2-135M-Instruct with `--real`) and get the
same `--batch` prompts of different lengths (~`--prompt-len` tokens, left-padded).

* JAX: `alignx_jax.generate.generate(greedy=True)` (what `alignx generate --greedy` runs: one
  jitted prefill + a `lax.while_loop` decode over a preallocated KV cache).
* transformers: `model.generate(do_sample=False, use_cache=True)`, float32, `torch.inference_mode`.

Stop tokens are disabled on both sides so every row generates exactly `--new-tokens` tokens
(tokens/s = batch * new tokens / seconds). After a warm-up call each round runs JAX then torch;
`jax_vs_transformers` is the median of per-round ratios; `outputs_identical`: every token identical.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "benchmarks")):
    if p not in sys.path:
        sys.path.insert(0, p)

import _smollm2 as common  # noqa: E402

NO_STOP = -1  # a stop id no token can take


def make_prompts(batch: int, vocab: int, prompt_len: int, seed: int, tokenizer=None) -> list[list[int]]:
    """`batch` prompts of 85%..100% of `prompt_len` tokens: random ids, or (with a tokenizer, for the
    real model) P-SOUPS prompts when the shared benchmark file is present."""
    rng = np.random.default_rng(seed)
    lengths = [int(x) for x in rng.integers(int(prompt_len * 0.85), prompt_len + 1, size=batch)]
    psoups = os.path.join(ROOT, "..", "shared", "benchmarks", "p-soups", "student_phd.json")
    if tokenizer is not None and os.path.isfile(psoups):
        with open(psoups, encoding="utf-8") as f:
            rows = json.load(f)
        out = []
        for i, n in enumerate(lengths):
            ids: list[int] = []
            j = i
            while len(ids) < n:  # consecutive rows' prompts, cut to the length
                ids += tokenizer(rows[j % len(rows)]["prompt"])["input_ids"]
                j += batch
            out.append(ids[:n])
        return out
    return [[1] + rng.integers(3, vocab, size=n - 1).tolist() for n in lengths]


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import torch

    from alignx_jax.generate import generate
    from alignx_jax.models.hf import load_pretrained

    path, what = common.hf_folder(args.shape, args.real, seed=args.seed)
    shape = common.model_shape(path)
    out: dict[str, Any] = {
        "benchmark": "generate",
        "model": what,
        "model_shape": shape,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "greedy": True,
        "torch_attn": args.torch_attn,
        "rounds": args.rounds,
        **common.machine(),
        "cpu_matmul": args.cpu_matmul,
        "cpu_pressure_start": common.cpu_pressure(),
        "load_average_start": list(os.getloadavg()),
    }
    tokenizer = None
    if args.real:
        from alignx_jax.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(path)
    prompts = make_prompts(args.batch, shape["vocab_size"], args.prompt_len, args.seed, tokenizer)
    out["prompt_lengths"] = [len(p) for p in prompts]
    pad_id = 2
    model = load_pretrained(path, cpu_matmul=args.cpu_matmul)
    tmodel = common.torch_model(path, args.torch_attn)

    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p) :] = torch.tensor(p)
        mask[b, T - len(p) :] = 1

    def jax_gen() -> list[list[int]]:
        return generate(model, None, prompts, max_new_tokens=args.new_tokens, greedy=True, stop_ids=[NO_STOP])

    def torch_gen() -> list[list[int]]:
        with torch.inference_mode():
            res = tmodel.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                use_cache=True,
                eos_token_id=None,
                pad_token_id=pad_id,
            )
        return res[:, T:].tolist()

    t0 = time.perf_counter()
    j_out = jax_gen()  # compiles
    out["jax_first_call_seconds"] = time.perf_counter() - t0
    t_out = torch_gen()
    times: dict[str, list[float]] = {"jax": [], "torch": []}
    for _ in range(args.rounds):
        for name, fn in (("jax", jax_gen), ("torch", torch_gen)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            print(
                f"round {len(times[name])}/{args.rounds} {name}: {times[name][-1]:.2f} s",
                file=sys.stderr,
                flush=True,
            )
    n_tok = args.batch * args.new_tokens
    med = statistics.median
    first_diff = [
        next((i for i, (a, b) in enumerate(zip(j, t)) if a != b), None) for j, t in zip(j_out, t_out)
    ]
    out.update(
        jax_tokens_per_sec=n_tok / med(times["jax"]),
        transformers_tokens_per_sec=n_tok / med(times["torch"]),
        jax_round_seconds=times["jax"],
        transformers_round_seconds=times["torch"],
        **common.ratios(times["jax"], times["torch"]),
        outputs_identical=bool(j_out == t_out),
        first_differing_token_per_row=first_diff,
        target=2.0,
        cpu_pressure_end=common.cpu_pressure(),
        load_average_end=list(os.getloadavg()),
    )
    out["target_met"] = out["jax_vs_transformers"] >= out["target"]
    if not args.real:
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="smollm2", choices=["smollm2", "tiny"])
    p.add_argument("--real", action="store_true", help="the real SmolLM2-135M-Instruct (.cache/models)")
    p.add_argument("--batch", type=int, default=8, help="prompts per batch")
    p.add_argument("--prompt-len", type=int, default=250)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--torch-attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument(
        "--cpu-matmul",
        default="auto",
        choices=["auto", "ynnpack", "onednn"],
        help="the JAX model's model.cpu_matmul (the library XLA's CPU backend calls for products)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="OUT.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.check_counts(batch=args.batch, new_tokens=args.new_tokens, rounds=args.rounds)
    common.check_counts(2, prompt_len=args.prompt_len)  # drawn from 85% of it: at least the BOS
    common.check_json_out(args.json)
    out = run(args)
    if args.json:
        common.write_json_out(args.json, out)
    keys = (
        "jax_tokens_per_sec",
        "transformers_tokens_per_sec",
        "jax_vs_transformers",
        "jax_vs_transformers_per_round",
        "outputs_identical",
    )
    print(json.dumps({k: out[k] for k in keys}, indent=2))
    return 0


if __name__ == "__main__":
    common.preload_allocator()  # before JAX starts
    sys.exit(main())
