"""PBA on Llama-3.1-70B-Instruct, 8 hosts of 8x H100 80GB (64 GPUs): the release's recipe.

    launch/gpu_multihost.sh --nodes 8 configs/llama3_70b_pba_gpu_64xh100.py --config.workdir=/shared/runs/pba70b \
        --config.model.hf_path=/models/Llama-3.1-70B-Instruct --config.data.train=/data/alignx

Tensor parallelism over the 8 GPUs of a host (NVLink), FSDP over the 8 hosts.
`alignx plan --config=configs/llama3_70b_pba_gpu_64xh100.py --json F` compiles this step for the
64 GPUs without weights; BENCHMARKS.md section 3 has its numbers.
"""

import os
import runpy

# the 70B PBA pod config (release recipe, joint head) with the GPU cluster's attention, mesh and rules
_PBA_70B = runpy.run_path(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama3_70b_pba_tpu_v5p_256.py")
)


def get_config():
    c = _PBA_70B["get_config"]()
    c.plan.topology = "64xH100"
    c.model.attention_impl = "cudnn"  # flash attention through jax.nn.dot_product_attention
    c.train.micro_batch = 8  # one pair per tensor-parallel group (host) per micro-step: 16 micro-steps
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 8, 8  # tensor: the 8 GPUs of a host; fsdp: the 8 hosts
    # the residual stream between layers (what per-layer remat keeps: 80 x [T, 8192] per sequence) is
    # split over the host's GPUs along the hidden dimension too, gathered for each layer's projections
    c.sharding.rules = tuple(
        (name, "tensor" if name == "activation_embed" else axes) for name, axes in c.sharding.rules
    )
    return c
