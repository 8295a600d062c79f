"""Tiny PBA run on CPU: as tiny_cpu.py, with the profile-text prompt and the preference head trained jointly.

`--config.pba.mode=two_stage` fits the head on the final policy instead; `--config.pba.preference=predicted`
(or `mix`) renders profiles from a first-stage head's P~ (see alignx_jax/pba/stages.py).
"""

import os
import runpy

_TINY = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_cpu.py"))


def get_config():
    c = _TINY["get_config"]()
    c.data.method = "pba"
    c.pba.enabled = True
    c.pba.weight = 1.0
    c.pba.stop_gradient = True
    c.pba.pooling = "mean"
    c.pba.hidden = 64
    c.pba.mode = "joint"
    c.pba.preference = "golden"
    c.pba.mix_predicted = 0.5
    c.pba.focal_gamma = 0.0
    c.pba.max_persona_tokens = 256  # synthetic personas are ~120-290 tokens; one persona bucket
    c.pba.lr = 1e-2  # a few steps must visibly move the head
    c.pba.head_steps = 200  # two-stage / first-stage head: a few seconds on cached features
    c.pba.head_batch_size = 32
    return c
