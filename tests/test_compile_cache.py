"""The persistent JAX compilation cache (`alignx_jax.compile_cache`, applied by the CLI's dispatch).

Independent reference: JAX itself, in a fresh process, writing executables into the folder chosen.
"""

from __future__ import annotations

import os
import subprocess
import sys

from alignx_jax import compile_cache

PROBE = """
import argparse, sys
import jax, jax.numpy as jnp
from alignx_jax import cli
cli._use_compile_cache(argparse.Namespace(command=sys.argv[1], overrides=sys.argv[2:]))
print(jax.config.jax_compilation_cache_dir)
jax.jit(lambda x: jnp.sin(x) * 3 + 1)(jnp.arange(7.0)).block_until_ready()
"""


def _probe(tmp_path, *argv, script=PROBE, **env):
    e = {
        k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "ALIGNX_COMPILE_CACHE")
    }
    e.update({"JAX_PLATFORMS": "cpu", "XDG_CACHE_HOME": str(tmp_path / "xdg"), **env})
    r = subprocess.run(
        [sys.executable, "-c", script, *argv],
        env=e,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.delenv("ALIGNX_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.cache_dir_for(str(tmp_path / "W")) == str(tmp_path / "W" / ".jax_cache")
    assert compile_cache.cache_dir_for(None) == str(tmp_path / "xdg" / "alignx" / "jax_cache")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache.cache_dir_for(str(tmp_path / "W")) == str(tmp_path / "mine")
    monkeypatch.setenv("ALIGNX_COMPILE_CACHE", "0")
    assert compile_cache.cache_dir_for(str(tmp_path / "W")) is None


def test_train_with_a_workdir_caches_executables_there(tmp_path):
    work = tmp_path / "W"
    used = _probe(tmp_path, "train", f"--config.workdir={work}")
    assert used == str(work / ".jax_cache")
    assert os.listdir(work / ".jax_cache")  # JAX wrote the jitted function's executable


def test_generate_uses_the_user_cache_and_the_environment_wins(tmp_path):
    assert _probe(tmp_path, "generate") == str(tmp_path / "xdg" / "alignx" / "jax_cache")
    assert os.listdir(tmp_path / "xdg" / "alignx" / "jax_cache")
    mine = tmp_path / "mine"
    assert _probe(tmp_path, "eval", JAX_COMPILATION_CACHE_DIR=str(mine)) == str(mine)
    assert _probe(tmp_path, "data") == "None"  # commands that do not compile leave JAX as it is


def test_the_environments_folder_keeps_every_executable_as_ours_does(tmp_path, monkeypatch):
    """`JAX_COMPILATION_CACHE_DIR` chooses the folder (README), but JAX's own 1 s threshold stayed in force
    there, so a command's quick compiles (the probe's, every tiny eval program) were never written and a
    rerun compiled them again; the commands' threshold applies to that folder too, as to their own folders.
    `ALIGNX_COMPILE_CACHE=0` leaves JAX's own settings as they are."""
    monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)  # conftest's 0.2 s
    mine = tmp_path / "mine"
    assert _probe(tmp_path, "eval", JAX_COMPILATION_CACHE_DIR=str(mine)) == str(mine)
    assert os.listdir(mine)  # the sub-second compile was written
    off = tmp_path / "off"
    assert _probe(tmp_path, "eval", JAX_COMPILATION_CACHE_DIR=str(off), ALIGNX_COMPILE_CACHE="0") == str(off)
    assert not off.exists() or not os.listdir(off)  # JAX's own setting, untouched


DEMO_PROBE = """
import sys
import jax
from alignx_jax import demo
demo.open_out(sys.argv[1], {"probe": True})
print(jax.config.jax_compilation_cache_dir)
"""


def test_demo_caches_in_its_output_unless_turned_off(tmp_path):
    """`alignx demo` keeps its executables in OUT/.jax_cache, and obeys the same switches as the CLI."""

    def used(out, **env):
        return _probe(tmp_path, str(out), script=DEMO_PROBE, **env)

    assert used(tmp_path / "a") == str(tmp_path / "a" / ".jax_cache")
    assert used(tmp_path / "b", ALIGNX_COMPILE_CACHE="0") in ("None", "")
    assert used(tmp_path / "c", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "mine")) == str(tmp_path / "mine")


def test_a_home_tilde_workdir_caches_in_that_home(tmp_path):
    """`--config.workdir=~/W` (a `~` the shell leaves after `=`): the config expands it, and the cache the
    command line chose before it went to a `./~/W/.jax_cache` folder of the working directory."""
    home = tmp_path / "home"
    used = _probe(tmp_path, "train", "--config.workdir=~/W", HOME=str(home))
    assert used == str(home / "W" / ".jax_cache")
    assert os.listdir(home / "W" / ".jax_cache") and not (tmp_path / "~").exists()
