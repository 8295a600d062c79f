"""Tiny PBA run on CPU: as tiny_cpu.py, with the profile-text prompt and the preference head section on."""

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
    return c
