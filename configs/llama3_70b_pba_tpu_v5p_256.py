"""PBA on Llama-3.1-70B-Instruct, TPU v5p-256 (128 chips: 32 hosts of 4 chips): the release's recipe.

    launch/tpu_pod.sh my-v5p-256 us-east5-a configs/llama3_70b_pba_tpu_v5p_256.py \
        --config.workdir=gs://BUCKET/pba70b \
        --config.model.hf_path=/models/Llama-3.1-70B-Instruct --config.data.train=/data/alignx

`alignx plan --config=configs/llama3_70b_pba_tpu_v5p_256.py --json F` compiles this step for the
128 chips (95 GiB HBM each) without weights; BENCHMARKS.md section 3 has its numbers.
"""

import os
import runpy

# the 8B PBA pod config (release recipe, joint head, splash attention, FSDP over every chip) at 70B
_PBA_8B = runpy.run_path(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama3_8b_pba_tpu_v5p_64.py")
)


def get_config():
    c = _PBA_8B["get_config"]()
    c.model.preset = "llama3-70b"  # what `alignx plan` compiles before --config.model.hf_path is given
    c.plan.topology = "v5p-256"
    c.train.micro_batch = 128  # one pair per chip per micro-step (32 hosts, one process each)
    return c
