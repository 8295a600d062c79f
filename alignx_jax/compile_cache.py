"""A persistent JAX compilation cache for the commands that compile (train, eval, generate, demo, plan).

`JAX_COMPILATION_CACHE_DIR` (JAX's own variable) wins when set; else the cache is `DIR/.jax_cache` for a
command with a working folder (a training workdir, a demo's output), else the user cache
(`$XDG_CACHE_HOME/alignx/jax_cache`, `~/.cache/alignx/jax_cache`). A cache that JAX was already given
(jax.config) is kept. `ALIGNX_COMPILE_CACHE=0` turns it off. A rerun then loads its executables instead
of compiling them (the train step of a 7-8B model takes minutes to compile).
"""

from __future__ import annotations

import os
import warnings

CACHE_NAME = ".jax_cache"
# XLA cannot serialize a CPU program whose products run in oneDNN (model.cpu_matmul): JAX warns at each such
# compile that it could not cache it, and compiles it again in the next process; nothing a user can act on
UNCACHEABLE_ONEDNN = r"Error writing persistent compilation cache entry .*onednn-fusion"


def cache_dir_for(workdir: str | None = None) -> str | None:
    """Where the cache goes for `workdir` (None: the user cache), or None when turned off."""
    if os.environ.get("ALIGNX_COMPILE_CACHE", "").strip().lower() in ("0", "false", "no", "off"):
        return None
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    if workdir and "://" not in workdir:  # a URL workdir (gs://...): the local user cache below
        return os.path.join(os.path.abspath(workdir), CACHE_NAME)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "alignx", "jax_cache")


def use_compile_cache(workdir: str | None = None, *, min_compile_secs: float = 0.0) -> str | None:
    """Point JAX's persistent compilation cache at `cache_dir_for(workdir)` unless JAX already has one;
    returns the folder in use (None: off). Call before the first compilation; cheap and idempotent."""
    import jax

    warnings.filterwarnings("ignore", message=UNCACHEABLE_ONEDNN, category=UserWarning)

    current = jax.config.jax_compilation_cache_dir
    path = cache_dir_for(workdir)
    # JAX read JAX_COMPILATION_CACHE_DIR at import: that variable only chooses the folder, what goes into it
    # is as for ours; a folder set otherwise (jax.config, in code) is kept with its settings
    if current and not (path is not None and current == path == os.environ.get("JAX_COMPILATION_CACHE_DIR")):
        return current
    if path is None:
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    # every executable: even a 1 s compile repeated on every eval/generate call adds up
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
    return path
