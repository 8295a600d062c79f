"""`alignx demo` training runs: the tiny CPU decoder with the demo's budget.

The demo (alignx_jax/demo.py) loads this file once per run and sets, by override, what differs
between runs: `workdir`, `model.hf_path` (the one shared initial model), `data.train` and
`data.method`. `configs/demo_cpu.py:quick` is the minute-long budget `alignx demo --quick` uses.

    alignx train --config=configs/demo_cpu.py --config.workdir=W --config.model.hf_path=INIT \
        --config.data.train=DATA --config.data.method=ica
"""

import os
import runpy

_TINY = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_cpu.py"))


def get_config(variant: str = "full"):
    c = _TINY["get_config"]()
    c.data.synth_users = 0  # the demo always names its data
    c.data.method = "ica"
    c.data.persona = "p"
    # synthetic ICA prompts are ~250 tokens (p90 ~330) with the shipped tokenizer; P-SOUPS ~400
    c.data.max_length = 768
    # 64-token steps: a batch pads to its longest row, not to the next power of two (ICA rows at
    # bucket 512 were 45% padding); each length (x each response window) costs one compile
    # up to 1536: a shared row (share_prompt below) takes up to 2 x max_length - 1 tokens
    c.data.buckets = tuple(range(64, 1537, 64))
    # one row per pair: an ICA prompt (~330 tokens) runs once, not once per response
    c.data.share_prompt = True
    # 64-token buckets already leave little padding, and at 0.66M parameters a step runs in
    # milliseconds while each extra compiled shape costs seconds: token compaction's extra shapes
    # made the demo slower (708 -> 856 s), so it is off here; it pays at scale
    c.data.compact_tokens = 0
    c.data.overflow = "truncate"

    c.model.init.hidden_size = 64
    c.model.init.intermediate_size = 256
    c.model.init.num_hidden_layers = 2
    c.model.init.num_attention_heads = 4
    c.model.init.num_key_value_heads = 4
    c.model.init.head_dim = 16
    c.model.init.max_position_embeddings = 1024
    c.model.init.seed = 0

    c.loss.logps_chunk = 0  # whole sequences in one chunk: they are short
    # DPO + the chosen response's NLL (as TRL's rpo_alpha), for every method alike. The paper starts
    # from an instruct model; ours is random, and pure DPO gives it one scalar per pair. Measured on
    # the held-out users at 600 steps: PBA-golden 0.71 without the term, 0.87 with it; ICA at
    # chance without, 0.66 with.
    c.loss.sft_weight = 1.0

    c.optim.lr = 1e-2  # measured: at 3e-3 x 200 steps every method stays at chance
    c.optim.warmup_ratio = 0.05
    c.optim.min_lr_ratio = 0.1

    c.train.steps = 600
    c.train.global_batch = 16
    c.train.micro_batch = 16
    c.train.seed = 42
    c.train.log_every = 1
    c.train.progress = True

    c.checkpoint.every_steps = 50
    c.checkpoint.keep = 1

    c.pba.enabled = False  # set per run by the demo (data.method=pba)
    c.pba.hidden = 128
    c.pba.pooling = "mean"
    c.pba.mode = "two_stage"
    c.pba.preference = "golden"

    if variant == "quick":
        c.train.steps = 2  # a smoke run: every stage of the chain, each training saving twice
        c.data.max_length = 384  # what `alignx demo --quick` trains at (demo.Budget)
        # one row length in practice (max_length 384 + the response reserve): one compile; 768 holds the
        # rare shared row past it (up to 2 x max_length - 1)
        c.data.buckets = (576, 768)
        c.train.global_batch = 4
        c.train.micro_batch = 4
        c.checkpoint.every_steps = 1
    elif variant != "full":
        raise ValueError(f"configs/demo_cpu.py: unknown variant {variant!r} (full | quick)")
    return c
