"""Models: the Llama/Qwen2 decoder (decoder.py), HF folders (hf.py, safetensors_io.py), orbax model checkpoints
(checkpoint.py), the PBA preference head.

Import the submodules directly (`from alignx_jax.models.decoder import Decoder`); this package
imports nothing heavy itself.
"""
