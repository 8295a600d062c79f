"""DPO step time of the three batch layouts on real ICA batches (synthetic users, shipped tokenizer).

    python benchmarks/layouts.py [--method ica] [--pairs 16] [--steps 10] [--hidden 64] [--pack-length 1024] [--json OUT.json]

The same pairs and the same model (the demo's tiny decoder unless sizes are given) through
`alignx_jax.train.step.make_train_step`, jitted as `alignx train` runs it:

- `full_logits`:    two rows per pair, output logits at every position (`loss.logits_on_responses=false`)
- `response_window`: two rows per pair, logits on each row's response window (the default)
- `shared_prompt`:  one row per pair, prompt + chosen + rejected (`data.share_prompt=true`)
- `packed`:         those rows packed several to a row of `--pack-length` tokens (`data.packing=true`)
- `*+compact`:      the layout with token compaction (`data.compact_tokens=8`, the default in
                    `alignx train`): norms, projections and MLP on the real tokens only

Reports the median step time and pairs/s of each, their loss on the second step (after one update
from the same weights: the same number, since the layouts change the cost, not the computation), and
the tokens (padding included) each pushes through the model per step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _smollm2, also when imported by a test


def build_batches(method: str, pairs: int, n_batches: int, seed: int = 0):
    """`n_batches` collated two-row batches of real rows (one history sample per row, as training draws)."""

    from alignx_jax.data import batching, persona, synth
    from alignx_jax.tokenizer import load_tokenizer

    tok = load_tokenizer()
    world = synth.generate_world(max(8, pairs * n_batches // 8 + 1), 8, seed)
    rows = world.rows[: pairs * n_batches]
    buckets = tuple(range(64, 513, 32)) + (576, 640, 704, 768, 896, 1024, 1152)
    out = []
    for i in range(n_batches):
        exs = [
            batching.make_example(
                tok,
                r,
                method=method,
                max_length=768,
                rng=persona.row_rng(seed, (0, i * pairs + j)),
                index=i * pairs + j,
            )
            for j, r in enumerate(rows[i * pairs : (i + 1) * pairs])
        ]
        out.append(batching.collate(exs, buckets=buckets, pad_id=int(tok.pad_token_id)))
    return out, buckets, int(tok.pad_token_id), len(tok)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="ica", choices=("ica", "pba", "none"))
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per layout (after one warm-up)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--pack-length", type=int, default=1024, help="row length of the packed layout")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import _smollm2  # beside this script

    _smollm2.check_counts(pairs=args.pairs, steps=args.steps, hidden=args.hidden, layers=args.layers)
    _smollm2.check_json_out(args.json)

    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np
    from flax import nnx

    from alignx_jax import config_schema
    from alignx_jax.batch import add_token_layout, to_microbatches
    from alignx_jax.data import batching
    from alignx_jax.models.decoder import Decoder, DecoderConfig
    from alignx_jax.train.state import ParamsCodec, make_optimizer
    from alignx_jax.train.step import make_train_step

    batches, buckets, pad_id, vocab = build_batches(args.method, args.pairs, args.steps + 1)
    cfg = DecoderConfig(
        vocab_size=vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=args.hidden // 4,
        max_position_embeddings=2048,
    )
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    codec = ParamsCodec.of(model)
    params0 = nnx.to_pure_dict(nnx.state(model))
    ref = jax.tree.map(lambda x: jnp.array(x, copy=True), params0)
    optim = ml_collections.ConfigDict(
        {
            "lr": 1e-3,
            "warmup_ratio": 0.0,
            "min_lr_ratio": 0.1,
            "b1": 0.9,
            "b2": 0.95,
            "eps": 1e-8,
            "weight_decay": 0.0,
            "clip": 1.0,
        }
    )
    tx, _ = make_optimizer(optim, 100)
    loss_cfg = config_schema.default_config().loss  # the release's sigmoid DPO, reference on the fly
    loss_cfg.logps_chunk = 0
    step = jax.jit(make_train_step(codec, tx, loss_cfg, precomputed=False))

    layouts = {
        "full_logits": lambda b: to_microbatches(b, 1),
        "response_window": lambda b: to_microbatches(b, 1, window=0),
        "shared_prompt": lambda b: to_microbatches(
            batching.share_prompt(b, buckets=buckets, pad_id=pad_id), 1
        ),
        "packed": lambda b: to_microbatches(
            batching.pack_pairs(
                batching.share_prompt(b, buckets=buckets, pad_id=pad_id),
                groups=1,
                length=args.pack_length,
                pad_id=pad_id,
            ),
            1,
        ),
    }
    for name in ("response_window", "shared_prompt"):  # data.compact_tokens on top (one group of rows)
        layouts[name + "+compact"] = lambda b, f=layouts[name]: add_token_layout(f(b), 1)
    results = {}
    for name, layout in layouts.items():
        host = [layout(b) for b in batches]
        params = jax.tree.map(lambda x: jnp.array(x, copy=True), params0)
        opt = tx.init(params)
        params, opt, _ = step(params, opt, ref, host[0])  # warm-up: compiles the first shape
        # the loss after one update (policy != reference): the same in every layout
        second_loss = float(step(params, opt, ref, host[1])[2]["loss"])
        for h in host[1:]:  # compile every shape outside the timed pass
            jax.block_until_ready(step(params, opt, ref, h))
        times = []
        for h in host[1:]:
            t0 = time.perf_counter()
            jax.block_until_ready(step(params, opt, ref, h))
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        results[name] = {
            "step_seconds": med,
            "pairs_per_sec": args.pairs / med,
            "second_step_loss": second_loss,
            "tokens_in_model": int(np.mean([h.input_ids.size for h in host])),
        }
        print(
            f"{name:16s} step {med * 1e3:8.1f} ms  {args.pairs / med:7.1f} pairs/s  "
            f"tokens/step {results[name]['tokens_in_model']:6d}  2nd-step loss {second_loss:.6f}",
            flush=True,
        )
    base = results["full_logits"]["step_seconds"]
    for r in results.values():
        r["speedup_vs_full_logits"] = base / r["step_seconds"]
    out = {
        "method": args.method,
        "pairs": args.pairs,
        "hidden": args.hidden,
        "layers": args.layers,
        "vocab": vocab,
        "steps": args.steps,
        "layouts": results,
        "devices": str(jax.devices()[0].platform),
        **_smollm2.machine(),
    }
    if args.json:
        _smollm2.write_json_out(args.json, out)
    return 0


if __name__ == "__main__":
    import _smollm2  # beside this script, which Python puts first on sys.path

    _smollm2.preload_allocator()  # before JAX starts: the allocator `alignx` runs CPU jobs with
    raise SystemExit(main())
