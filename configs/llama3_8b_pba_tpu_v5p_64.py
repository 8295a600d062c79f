"""PBA on Llama-3.1-8B-Instruct, TPU v5p-64 (32 chips: 8 hosts of 4 chips): the release's recipe.

    launch/tpu_pod.sh my-v5p us-east5-a configs/llama3_8b_pba_tpu_v5p_64.py --config.workdir=gs://BUCKET/pba8b \
        --config.model.hf_path=/models/Llama-3.1-8B-Instruct --config.data.train=/data/alignx

FSDP over all 32 chips (95 GiB HBM each); one pair per chip per micro-step, 4 micro-steps of 32
pairs make the global batch of 128.
"""

import os
import runpy

_BASE = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "base.py"))


def get_config():
    c = _BASE["release_recipe"](_BASE["get_config"]())
    c.model.preset = "llama3-8b"  # what `alignx plan` compiles before --config.model.hf_path is given
    c.plan.topology = "v5p-64"
    c.model.attention_impl = "splash"  # Pallas splash flash attention (rows are multiples of 128)
    c.data.method = "pba"
    c.train.micro_batch = 32  # one pair per chip per micro-step; 4 micro-steps make the batch of 128
    c.train.distributed = True  # one process per TPU host (8 on a v5p-64), wired by jax.distributed
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1

    c.pba.enabled = True
    c.pba.weight = 1.0
    c.pba.mode = "joint"
    # the release's profile: P~ of the row's sampled history ('golden' = the golden-direction variant);
    # 'predicted'/'mix' and mode 'two_stage' also run on a pod (every host fits the same first-stage head)
    c.pba.preference = "history"
    c.pba.stop_gradient = True
    c.pba.focal_gamma = 0.0
    c.pba.max_persona_tokens = 1024  # <= the smallest data bucket, so one persona length per step
    c.pba.lr = 1e-3
    return c
