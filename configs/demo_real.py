"""`alignx demo --real`: SmolLM2-135M-Instruct (the `smollm2` preset) personalized on a P-SOUPS split.

The demo (alignx_jax/demo_real.py) loads this file once per run and sets, by override, what differs
between runs: `workdir`, `data.train`, `data.method` and `train.steps` (the same for all three runs:
`train.epochs` passes of two rows per training pair). ICA and PBA train on the training half twice plus
its persona-contrast rows (`alignx data contrast --originals 2`), the non-personalized run on the
training half itself (a contrast row contradicts its pair without the persona).
`configs/demo_real.py:quick` is the few-minute budget of `alignx demo --real --quick`.

    alignx data contrast TRAIN.json --out CONTRAST.json --originals 2
    alignx train --config=configs/demo_real.py --config.workdir=W --config.data.train=CONTRAST.json \
        --config.data.method=ica
"""

import os
import runpy

_BASE = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "base.py"))


def get_config(variant: str = "full"):
    c = _BASE["get_config"]()
    c.model.hf_path = "smollm2"  # the shipped real model (alignx_jax.real_model; `make real-model`)
    # float32 parameters and optimizer; compute in bf16 where it is fast (GPU/TPU, CPUs with AMX: 2.5-4x
    # float32's products, AMD CPUs with AVX-512-BF16: 1.6x) and in float32 on other CPUs, where bf16 is
    # slower (BENCHMARKS.md §4);
    # `alignx demo --real` scores in the same dtype
    c.model.dtype = "auto"
    c.model.param_dtype = "float32"
    # recompute each block in the backward: on CPU in bf16 this is faster than keeping the blocks'
    # bf16 residuals, which the layer scan stacks per layer (BENCHMARKS.md §4)
    c.model.remat = "full"
    c.model.scan_layers = True
    # LoRA on every projection of the top 15 of 30 blocks: with twins, the top 8 blocks fully trained
    # stayed at chance, adapters learned to read the persona (docs/recipes.md, section 2); the backward pass
    # stops at block 15, ~0.6x the step of adapters on all 30; `alignx demo --real --model` freezes the
    # bottom half of any other model the same way (demo_real.frozen_layers)
    c.model.frozen_layers = 15
    c.model.lora.rank = 16

    c.data.method = "ica"
    c.data.persona = "p"  # P-SOUPS rows carry history pairs only: P = PAIR
    c.data.prompt_format = "chat"  # the instruct model's own ChatML template
    c.data.max_length = 1024
    c.data.buckets = tuple(range(128, 2049, 64))  # a shared row takes up to 2 x max_length - 1 tokens
    c.data.share_prompt = True  # one row per pair: the ~370-token ICA prompt runs once
    c.data.length_groups = 8  # batches of similar length: ~27% fewer positions on the PBA rows
    # not twins in one batch: they cancel a preference both personas share, which friendly_unfriendly's
    # have (docs/recipes.md, section 2); the contrast rows beside each pair twice keep a third of it
    c.data.twins = False
    c.data.compact_tokens = 0  # 64-token buckets leave little padding; each kept size is a compile
    c.data.overflow = "truncate"

    c.loss.type = "sigmoid"
    c.loss.beta = 0.1
    c.loss.sft_weight = 0.0
    # the reference on the policy's pass of the frozen blocks (only the blocks above the cut run twice):
    # a precomputed pass would score 148 (ICA: the history is drawn again every epoch) and 112 (PBA) of
    # the 148 batches, each at ~1.4x the step's added cost (BENCHMARKS.md §4); the non-personalized run,
    # whose later epochs repeat its batches, precomputes (alignx_jax/demo_real.py, REFERENCE)
    c.loss.reference = "on_the_fly"
    c.loss.logps_chunk = 0

    c.optim.lr = 5e-4  # adapters take a larger rate than full fine-tuning
    c.optim.warmup_ratio = 0.1
    c.optim.min_lr_ratio = 0.1
    c.optim.weight_decay = 0.0

    c.train.steps = -1
    # two passes of two rows per training pair (as two passes over twins, where one pass, of batch 8 or
    # of 4, barely read the persona)
    c.train.epochs = 2
    c.train.global_batch = 8
    c.train.micro_batch = 8
    c.train.seed = 42
    c.train.log_every = 1
    c.train.progress = True

    c.checkpoint.every_steps = 20
    c.checkpoint.keep = 1

    c.pba.enabled = False  # PBA's policy trains on the file's profile text (no head: P-SOUPS has no vectors)

    if variant == "quick":
        # one step of 2 pairs: each step shape costs a train-step and a reference compile of the 135M model
        c.train.steps = 1
        c.train.epochs = 1
        c.train.global_batch = 2
        c.train.micro_batch = 2
        c.checkpoint.every_steps = 1
        # one row length, 832, that holds the demo's pairs (max_length 512 + the response reserve): the three
        # runs share one compiled step (with 512 as well, the PBA run's longer profile prompts compiled a
        # second); 1024 holds any shared row (up to 2 x max_length - 1), compiled only if one needs it
        c.data.max_length = 512  # what `alignx demo --real --quick` trains at (demo_real.RealBudget)
        c.data.buckets = (832, 1024)
        # and the same pairs for ICA and PBA: grouped by length, PBA's longer prompts picked other pairs, whose
        # longest response needed another scored window (a power of two) and so another compile of the step
        c.data.length_groups = 0
    elif variant != "full":
        raise ValueError(f"configs/demo_real.py: unknown variant {variant!r} (full | quick)")
    return c
