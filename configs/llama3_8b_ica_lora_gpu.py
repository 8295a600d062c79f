"""ICA on Llama-3.1-8B-Instruct with LoRA on ONE 80 GB GPU (H100/A100) at 8192 tokens.

    alignx train --config configs/llama3_8b_ica_lora_gpu.py --config.workdir=runs/ica8b-lora \
        --config.model.hf_path=/models/Llama-3.1-8B-Instruct --config.data.train=/data/alignx
    alignx plan --config configs/llama3_8b_ica_lora_gpu.py      # the memory report (no weights needed)

The release's recipe (configs/llama3_8b_ica_gpu.py) with: a bfloat16 frozen base (model.param_dtype;
~15 GiB, also DPO's reference with the adapters off, so no second copy), rank-16 LoRA adapters on every
projection (~42M float32 params + Adam moments, <1 GiB), per-layer remat, one pair (two 8192-token
sequences) per micro-step and 128 micro-steps per optimizer step (the global batch of 128). README's
`alignx plan` section has the planned bytes. The rest is the release's recipe, lr 5e-7 included; LoRA
usually wants a larger learning rate than full fine-tuning (e.g. --config.optim.lr=5e-6), untested here.
"""

import os
import runpy

_BASE = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "base.py"))


def get_config():
    c = _BASE["release_recipe"](_BASE["get_config"]())
    c.model.preset = "llama3-8b"  # what `alignx plan` compiles before --config.model.hf_path is given
    c.plan.topology = "1xH100"
    c.model.attention_impl = "cudnn"  # flash attention through jax.nn.dot_product_attention
    c.model.param_dtype = "bfloat16"  # the frozen base; the adapters and their optimizer stay float32
    c.model.lora.rank, c.model.lora.alpha = 16, 32.0
    c.model.remat = "full"
    c.data.method = "ica"
    c.train.micro_batch = 1  # one pair per micro-step; 128 micro-steps make the batch of 128
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    return c
