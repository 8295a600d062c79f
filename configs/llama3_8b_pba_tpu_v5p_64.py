"""PBA on Llama-3.1-8B-Instruct, TPU v5p-64 (32 chips, 4 hosts): the release's recipe.

    launch/tpu_pod.sh my-v5p us-east5-a configs/llama3_8b_pba_tpu_v5p_64.py --config.workdir=gs://.../pba8b \
        --config.model.hf_path=/models/Llama-3.1-8B-Instruct --config.data.train=/data/alignx

FSDP over all 32 chips (95 GiB HBM each); one pair per chip per micro-step, 4 micro-steps of 32
pairs make the global batch of 128.
"""

import os
import runpy

_BASE = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "base.py"))


def get_config():
    c = _BASE["get_config"]()
    c.model.hf_path = ""  # required on the command line
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = "full"
    c.model.scan_layers = True
    c.model.attention_impl = "chunked"  # no splash kernel yet: query-chunked XLA attention keeps [1024, T] scores per head

    c.data.train = ""  # required on the command line
    c.data.method = "pba"
    c.data.persona = "p"
    c.data.prompt_format = "chat"
    c.data.max_length = 8192
    c.data.buckets = (1024, 2048, 4096, 8192)
    c.data.overflow = "drop"

    c.loss.type = "sigmoid"
    c.loss.beta = 0.1
    c.loss.reference = "on_the_fly"
    c.loss.logps_chunk = 1024

    c.optim.lr = 5e-7
    c.optim.warmup_ratio = 0.1
    c.optim.min_lr_ratio = 0.1
    c.optim.b1, c.optim.b2 = 0.9, 0.95
    c.optim.weight_decay = 0.0
    c.optim.clip = 1.0

    c.train.steps = -1
    c.train.epochs = 1
    c.train.global_batch = 128
    c.train.micro_batch = 32
    c.train.seed = 42
    c.train.distributed = True

    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1

    c.checkpoint.every_steps = 200
    c.checkpoint.keep = 3

    c.pba.enabled = True
    c.pba.weight = 1.0
    c.pba.mode = "joint"
    c.pba.preference = "golden"  # 'predicted'/'mix' and mode 'two_stage' are single-process only
    c.pba.stop_gradient = True
    c.pba.focal_gamma = 0.0
    c.pba.max_persona_tokens = 1024  # <= the smallest data bucket, so one persona length per step
    c.pba.lr = 1e-3
    return c
