"""Models: the Llama/Qwen2 decoder (decoder.py), HF/orbax checkpoints (hf.py), the PBA preference head.

Import the submodules directly (`from alignx_jax.models.decoder import Decoder`); this package
imports nothing heavy itself.
"""
