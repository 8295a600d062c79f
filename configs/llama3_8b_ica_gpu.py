"""ICA on Llama-3.1-8B-Instruct, one host with 8x H100 80GB: the release's recipe (METHOD.md section 6).

    launch/gpu_host.sh configs/llama3_8b_ica_gpu.py --config.workdir=runs/ica8b \
        --config.model.hf_path=/models/Llama-3.1-8B-Instruct --config.data.train=/data/alignx

Memory: FSDP over the 8 GPUs keeps fp32 master weights + Adam moments at ~12 GiB per GPU; one
pair (two 8192-token sequences) per GPU per micro-step with per-layer remat; 16 micro-steps of
8 pairs make the global batch of 128.
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
    c.model.attention_impl = "cudnn"

    c.data.train = ""  # required on the command line
    c.data.method = "ica"
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
    c.train.micro_batch = 8
    c.train.seed = 42

    c.mesh.data = 1
    c.mesh.fsdp = 8
    c.mesh.tensor = 1

    c.checkpoint.every_steps = 200
    c.checkpoint.keep = 3
    return c
