"""Scoring throughput: `alignx eval`'s sequence scorer vs a transformers forward, same pairs.

    python benchmarks/score.py [--shape smollm2|tiny] [--real] [--batch 8] [--batches 2] \
        [--prompt-len 250] [--response-len 50] [--rounds 5] [--torch-attn sdpa|eager] --json OUT.json

Both sides load one HF folder: random float32 weights at SmolLM2-135M's shape written by
`LlamaForCausalLM(LlamaConfig(...))` (default), or the real SmolLM2-135M-Instruct with `--real`.
Pairs are P-SOUPS-like (prompt ~250 tokens, responses ~50 + EOS), `--batch` pairs per batch.

* JAX: what `alignx eval` runs per batch: `evaluate.score_batches` (collate with
  `evaluate.length_buckets`) through `evaluate.SequenceScorer(share_prompt=True)`, the default
  (one row per pair, the prompt computed once; logits on the response positions only).
* transformers: `AutoModelForCausalLM` float32 (`--torch-attn`, default sdpa), one forward over
  the 2B right-padded rows (the same collated batch), float32 `log_softmax` + gather + masked sum,
  under `torch.inference_mode`.

After a warm-up (compilation) each round scores every batch on the JAX side, then on the torch
side; pairs/s per side is the median over rounds, `jax_vs_transformers` the median of per-round
ratios. `outputs_identical`: identical chosen > rejected decisions and |log-prob diff| <= 1e-3.
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

TOL = 1e-3


def make_examples(n: int, vocab: int, eos: int, prompt: int, response: int, seed: int) -> list[Any]:
    from alignx_jax.data.batching import DPOExample

    rng = np.random.default_rng(seed)
    out = []
    for i, (p, c, r) in enumerate(common.psoups_lengths(rng, n, prompt, response)):
        ids = lambda k: rng.integers(3, vocab, size=k).tolist()
        out.append(
            DPOExample(
                prompt_ids=[1] + ids(p - 1),
                chosen_ids=ids(c - 1) + [eos],
                rejected_ids=ids(r - 1) + [eos],
                index=i,
            )
        )
    return out


def torch_scorer(model):
    import torch

    def score(batch: dict[str, np.ndarray]) -> np.ndarray:
        ids = torch.from_numpy(batch["input_ids"].astype(np.int64))
        with torch.inference_mode():
            logits = model(
                input_ids=ids,
                attention_mask=torch.from_numpy(batch["attention_mask"].astype(np.int64)),
                position_ids=torch.from_numpy(batch["positions"].astype(np.int64)),
            ).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            tok = torch.gather(logp, 2, ids[:, 1:, None]).squeeze(2)
            lp = (tok * torch.from_numpy(batch["loss_mask"][:, 1:].astype(np.float32))).sum(-1)
        return lp.double().numpy()

    return score


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from alignx_jax.data.batching import collate
    from alignx_jax.evaluate import SequenceScorer, length_buckets, score_batches
    from alignx_jax.models.hf import load_pretrained
    from alignx_jax.sharding import make_mesh

    path, what = common.hf_folder(args.shape, args.real, seed=args.seed)
    shape = common.model_shape(path)
    out: dict[str, Any] = {
        "benchmark": "score",
        "model": what,
        "model_shape": shape,
        "batch_pairs": args.batch,
        "batches_per_round": args.batches,
        "prompt_len": args.prompt_len,
        "response_len": args.response_len,
        "share_prompt": True,
        "torch_attn": args.torch_attn,
        "rounds": args.rounds,
        **common.machine(),
        "cpu_matmul": args.cpu_matmul,
        "cpu_pressure_start": common.cpu_pressure(),
        "load_average_start": list(os.getloadavg()),
    }
    n = args.batch * args.batches
    eos = 2
    examples = make_examples(n, shape["vocab_size"], eos, args.prompt_len, args.response_len, args.seed)
    buckets = length_buckets(max(ex.length for ex in examples))
    pad_id = eos

    mesh = make_mesh(data=-1)
    policy = load_pretrained(path, mesh=mesh, cpu_matmul=args.cpu_matmul)
    scorer = SequenceScorer(policy, mesh, None, share_prompt=True)
    tmodel = common.torch_model(path, args.torch_attn)
    tscore = torch_scorer(tmodel)
    tbatches = [
        collate(examples[s : s + args.batch], buckets=buckets, pad_id=pad_id, num_pairs=args.batch)
        for s in range(0, n, args.batch)
    ]
    out["tokens_per_batch"] = int(np.mean([b["attention_mask"].sum() for b in tbatches]))
    out["padded_length"] = int(tbatches[0]["input_ids"].shape[1])

    def jax_round() -> np.ndarray:
        # exactly `alignx eval`'s loop: collate (longest first) + SequenceScorer per batch
        res = [
            lp
            for _, outs in score_batches(
                examples, [scorer], batch_size=args.batch, pad_id=pad_id, buckets=buckets
            )
            for lp in outs
        ]
        return np.concatenate(res)  # [n, 2] in score_batches' (longest-first) order

    order = sorted(range(n), key=lambda i: -examples[i].length)

    def torch_round() -> np.ndarray:
        res = []
        for s in range(0, n, args.batch):
            chunk = [examples[i] for i in order[s : s + args.batch]]
            lp = tscore(collate(chunk, buckets=buckets, pad_id=pad_id, num_pairs=args.batch))
            res.append(np.stack([lp[: len(chunk)], lp[args.batch : args.batch + len(chunk)]], -1))
        return np.concatenate(res)

    t0 = time.perf_counter()
    j_lp = jax_round()  # compiles
    out["jax_first_round_seconds"] = time.perf_counter() - t0
    t_lp = torch_round()
    times: dict[str, list[float]] = {"jax": [], "torch": []}
    for _ in range(args.rounds):
        for name, fn in (("jax", jax_round), ("torch", torch_round)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            print(
                f"round {len(times[name])}/{args.rounds} {name}: {times[name][-1]:.2f} s",
                file=sys.stderr,
                flush=True,
            )
    diff = float(np.max(np.abs(j_lp - t_lp)))
    same_decisions = bool(np.array_equal(j_lp[:, 0] > j_lp[:, 1], t_lp[:, 0] > t_lp[:, 1]))
    med = statistics.median
    out.update(
        jax_pairs_per_sec=n / med(times["jax"]),
        transformers_pairs_per_sec=n / med(times["torch"]),
        jax_round_seconds=times["jax"],
        transformers_round_seconds=times["torch"],
        **common.ratios(times["jax"], times["torch"]),
        max_abs_logp_diff=diff,
        decisions_identical=same_decisions,
        accuracy_jax=float(np.mean(j_lp[:, 0] > j_lp[:, 1])),
        accuracy_transformers=float(np.mean(t_lp[:, 0] > t_lp[:, 1])),
        outputs_identical=bool(same_decisions and diff <= TOL),
        target=1.5,
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
    p.add_argument("--batch", type=int, default=8, help="pairs per batch")
    p.add_argument("--batches", type=int, default=2, help="batches scored per round")
    p.add_argument("--prompt-len", type=int, default=250)
    p.add_argument("--response-len", type=int, default=50)
    p.add_argument("--rounds", type=int, default=5)
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
    common.check_counts(
        batch=args.batch, batches=args.batches, rounds=args.rounds, response_len=args.response_len
    )
    common.check_counts(2, prompt_len=args.prompt_len)  # drawn from 85% of it: at least the BOS
    common.check_json_out(args.json)
    out = run(args)
    if args.json:
        common.write_json_out(args.json, out)
    keys = (
        "jax_pairs_per_sec",
        "transformers_pairs_per_sec",
        "jax_vs_transformers",
        "jax_vs_transformers_per_round",
        "max_abs_logp_diff",
        "outputs_identical",
    )
    print(json.dumps({k: out[k] for k in keys}, indent=2))
    return 0


if __name__ == "__main__":
    common.preload_allocator()  # before JAX starts
    sys.exit(main())
