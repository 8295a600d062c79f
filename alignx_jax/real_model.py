"""The shipped real model from the command line: `python -m alignx_jax.real_model` prepares (if
needed) the SmolLM2 HF folder and prints it (`make real-model`). The preset and the model-path
resolver live in `alignx_jax.models.presets` (re-exported here).
"""

from __future__ import annotations

import sys

from alignx_jax.errors import CheckpointError
from alignx_jax.models.presets import (  # noqa: F401  (re-exported)
    REPO_ROOT,
    SMOLLM2,
    SMOLLM2_FOLDER,
    SMOLLM2_GGUF,
    SMOLLM2_WHEEL,
    cache_root,
    gguf_path,
    resolve_model_path,
    smollm2_dir,
)


def main() -> int:
    try:
        print(smollm2_dir())
    except CheckpointError as e:
        print(f"alignx: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
