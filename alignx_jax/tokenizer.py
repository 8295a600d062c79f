"""Tokenizer loading: a model folder's tokenizer, or the shipped tiny byte-level BPE.

The tiny tokenizer (built by `scripts/build_tokenizer.py`) has Llama-3-style special tokens:
`<|begin_of_text|>` (bos), `<|eot_id|>` (eos, as in Llama-3.1-Instruct), `<|pad|>` (pad),
`<|start_header_id|>`, `<|end_header_id|>`, `<|end_of_text|>`, and a Llama-3 chat template.
"""

from __future__ import annotations

import json
import os

from alignx_jax.errors import CheckpointError

TINY_TOKENIZER_DIR: str = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tokenizer")


def load_tokenizer(path: str | None = None):
    """Load a `transformers` tokenizer from `path` (local files only); None -> the shipped tiny one.

    Raises CheckpointError when the folder does not exist or holds no loadable tokenizer.
    """
    path = TINY_TOKENIZER_DIR if path is None else os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"tokenizer folder not found: {path}")
    if not any(
        os.path.exists(os.path.join(path, f))
        for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    ):
        raise CheckpointError(f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    try:
        tok = _tokenizer_class(path).from_pretrained(path, local_files_only=True)
    except Exception as e:  # a broken folder is the user's to fix: say which
        raise CheckpointError(f"{path}: cannot load tokenizer: {type(e).__name__}: {e}") from e
    if tok.pad_token_id is None:  # Llama-3 ships none; batching needs one that is never scored
        tok.pad_token = tok.eos_token
    return tok


def _tokenizer_class(path: str):
    """The class to load `path` with: AutoTokenizer, whose imports pull in torch (~3 s of a CLI start-up),
    except for a tokenizer-only folder (no model `config.json`, so no model type for AutoTokenizer to map)
    declaring the plain fast class, which AutoTokenizer loads as that class."""
    try:
        with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
            declared = json.load(f).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        declared = None
    if (
        declared in ("PreTrainedTokenizerFast", "TokenizersBackend")
        and os.path.exists(os.path.join(path, "tokenizer.json"))
        and not os.path.exists(os.path.join(path, "config.json"))
    ):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast
    from transformers import AutoTokenizer  # heavy import: only when a tokenizer is needed

    return AutoTokenizer


def generation_config_eos_ids(tokenizer) -> list[int]:
    """The eos ids of `generation_config.json` beside the tokenizer (the model's folder: an HF folder, a
    checkpoint, a workdir's reference/): transformers' `generate` stops on them too, and some models list
    their end-of-turn token only there (Gemma-2's `<end_of_turn>`). Its sampling settings are not read."""
    folder = getattr(tokenizer, "name_or_path", None)
    path = os.path.join(folder, "generation_config.json") if isinstance(folder, str) and folder else ""
    if not path or not os.path.isfile(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: malformed generation config: {e}") from e
    eos = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in eos if i is not None):
        raise CheckpointError(f"{path}: eos_token_id must be an id or a list of ids, got {eos!r}")
    return [i for i in eos if i is not None]


def stop_token_ids(tokenizer) -> list[int]:
    """The token ids that end a generated response: the tokenizer's eos and the eos ids of the
    generation_config.json beside it (no token is a stop token by its spelling)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    ids.update(generation_config_eos_ids(tokenizer))
    return sorted(ids)
