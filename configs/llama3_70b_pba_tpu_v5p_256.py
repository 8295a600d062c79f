"""PBA on Llama-3.1-70B-Instruct, TPU v5p-256 (128 chips: 32 hosts of 4 chips): the release's recipe.

    launch/tpu_pod.sh my-v5p-256 us-east5-a configs/llama3_70b_pba_tpu_v5p_256.py \
        --config.workdir=gs://BUCKET/pba70b \
        --config.model.hf_path=/models/Llama-3.1-70B-Instruct --config.data.train=/data/alignx

`alignx plan --config=configs/llama3_70b_pba_tpu_v5p_256.py --json F` compiles this step for the
128 chips (95 GiB HBM each) without weights; BENCHMARKS.md section 3 has its numbers.
"""

import os
import runpy

_BASE = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "base.py"))


def get_config():
    c = _BASE["release_recipe"](_BASE["get_config"]())  # seq 8192, global batch 128, remat full, scan
    c.model.preset = "llama3-70b"  # what `alignx plan` compiles before --config.model.hf_path is given
    c.plan.topology = "v5p-256"
    c.model.attention_impl = "splash"  # Pallas splash flash attention (rows are multiples of 128)
    c.data.method = "pba"
    c.train.micro_batch = 128  # one pair per chip per micro-step
    c.train.distributed = True  # one process per TPU host (32 on a v5p-256), wired by jax.distributed
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1

    c.pba.enabled = True
    c.pba.weight = 1.0
    c.pba.mode = "joint"
    c.pba.preference = "history"
    c.pba.stop_gradient = True
    c.pba.focal_gamma = 0.0
    c.pba.max_persona_tokens = 1024  # <= the smallest data bucket, so one persona length per step
    c.pba.lr = 1e-3
    return c
