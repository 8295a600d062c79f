"""ICA on Qwen2.5-7B-Instruct, one host with 8x H100: the same recipe as llama3_8b_ica_gpu.py.

Qwen2.5's 152k vocabulary makes the logits the largest activation, so log-probs are chunked finer.
"""

import os
import runpy

_LLAMA = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama3_8b_ica_gpu.py"))


def get_config():
    c = _LLAMA["get_config"]()
    c.model.hf_path = ""  # required on the command line: /models/Qwen2.5-7B-Instruct
    c.model.preset = "qwen2.5-7b"  # what `alignx plan` compiles without weights (not the Llama base's)
    c.loss.logps_chunk = 512
    # the release's strings are Llama-3's (`<|start_header_id|>`... are not Qwen tokens, and the release
    # trained no Qwen model): Qwen keeps its own chat template (the project's ICA text, docs/method.md)
    c.data.prompt_format = "chat"
    return c
