"""alignx-jax: AlignX personalized alignment (ICA and PBA) in JAX/Flax NNX.

`import alignx_jax` is cheap: the model and generation entry points load on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_pretrained", "generate", "__version__"]

_LAZY = {
    "load_pretrained": ("alignx_jax.models.hf", "load_pretrained"),
    "generate": ("alignx_jax.generate", "generate"),
}


def __getattr__(name: str) -> Any:  # PEP 562: import jax/flax only when a model is needed
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'alignx_jax' has no attribute {name!r}")
