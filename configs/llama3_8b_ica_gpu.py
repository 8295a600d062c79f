"""ICA on Llama-3.1-8B-Instruct, one host with 8x H100 80GB: the release's recipe (docs/method.md section 6).

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
    c = _BASE["release_recipe"](_BASE["get_config"]())
    c.model.preset = "llama3-8b"  # what `alignx plan` compiles before --config.model.hf_path is given
    c.plan.topology = "8xH100"
    c.model.attention_impl = "cudnn"  # flash attention through jax.nn.dot_product_attention
    c.data.method = "ica"
    c.train.micro_batch = 8  # one pair per GPU per micro-step; 16 micro-steps make the batch of 128
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 8, 1
    return c
