"""Tiny ICA run on CPU: a random-init Llama-style decoder with the shipped tokenizer on synthetic data.

Seconds per few steps on two cores; `alignx train --config=configs/tiny_cpu.py --config.workdir=W`.
With `data.train` '' the run first writes synthetic users into W/data (as `alignx synth` does).
"""

import os
import runpy

_BASE = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "base.py"))


def get_config():
    c = _BASE["get_config"]()
    c.model.hf_path = ""
    c.model.init.enabled = True
    c.model.init.vocab_size = -1  # the shipped tokenizer's 4096
    c.model.init.hidden_size = 64
    c.model.init.intermediate_size = 128
    c.model.init.num_hidden_layers = 2
    c.model.init.num_attention_heads = 4
    c.model.init.num_key_value_heads = 2
    c.model.init.head_dim = 16
    c.model.init.max_position_embeddings = 2048
    c.model.dtype = "float32"  # CPU: bf16 matmuls are slow and add noise to the tiny parity tests
    c.model.remat = "none"
    c.model.scan_layers = True

    c.data.method = "ica"
    c.data.max_length = 1024
    c.data.buckets = (256, 512, 1024)
    c.data.overflow = "truncate"
    c.data.synth_users = 32
    c.data.synth_pairs_per_user = 4

    c.loss.logps_chunk = 256

    # a random-init model needs a far larger step than the release's 5e-7 to move in a few steps
    c.optim.lr = 1e-3
    c.optim.warmup_ratio = 0.1

    c.train.steps = 20
    c.train.global_batch = 8
    c.train.micro_batch = 4
    c.train.seed = 42
    c.train.log_every = 1

    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1

    c.checkpoint.every_steps = 10
    c.checkpoint.keep = 2
    return c
