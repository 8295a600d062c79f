"""Hub ids as model paths (`alignx_jax.hub`, through `models.presets.resolve_model_path`), offline only.

The independent reference is a Hugging Face hub cache the test fills itself, in the layout
huggingface_hub reads (`models--ORG--NAME/{blobs,snapshots/<commit>,refs/<branch>}`, snapshot files
symlinked to blobs), under a tmp HF_HOME with HF_HUB_OFFLINE=1 and an unreachable endpoint: nothing is
ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from alignx_jax import hub
from alignx_jax.cli import main
from alignx_jax.errors import CheckpointError
from alignx_jax.real_model import resolve_model_path

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CARD = "---\nlicense: llama3.1\nlanguage: en\n---\n# tiny\n"


def fill_hub_cache(cache: str, repo_id: str, src: str, *, commit: str = COMMIT, refs=("main",)) -> str:
    """Put the files of `src` into the hub cache `cache` as revision `commit` of `repo_id`; returns the
    snapshot folder."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snap = os.path.join(repo, "snapshots", commit)
    os.makedirs(snap, exist_ok=True)
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    files = {n: open(os.path.join(src, n), "rb").read() for n in sorted(os.listdir(src))}
    files["README.md"] = CARD.encode()
    for name, data in files.items():
        blob = os.path.join(repo, "blobs", hashlib.sha256(data).hexdigest())
        with open(blob, "wb") as f:
            f.write(data)
        os.symlink(os.path.relpath(blob, snap), os.path.join(snap, name))
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    for ref in refs:
        with open(os.path.join(repo, "refs", ref), "w") as f:
            f.write(commit)
    return snap


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty hub cache under a tmp HF_HOME, offline, with an endpoint nothing listens on."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.chdir(tmp_path)
    return str(home / "hub")


def test_parse_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub.parse_hub_id("meta-llama/Llama-3.1-8B-Instruct") == ("meta-llama/Llama-3.1-8B-Instruct", None)
    assert hub.parse_hub_id("Qwen/Qwen2.5-7B-Instruct@v1.0") == ("Qwen/Qwen2.5-7B-Instruct", "v1.0")
    assert hub.parse_hub_id(f"org/name@{COMMIT}") == ("org/name", COMMIT)
    for local in ("./org/name", "/abs/org/name", "~/m", "a/b/c", "gpt2", "../x/y", "", "org/name/"):
        assert hub.parse_hub_id(local) is None, local
    (tmp_path / "org" / "name").mkdir(parents=True)  # an existing folder is never a hub id
    assert hub.parse_hub_id("org/name") is None and resolve_model_path("org/name") == "org/name"


def test_cached_hub_id_resolves_offline(tiny_hf_checkpoints, offline_hub):
    snap = fill_hub_cache(
        offline_hub, "tiny-org/tiny-llama", tiny_hf_checkpoints["llama"], refs=("main", "v1")
    )
    assert hub.cache_dir() == offline_hub
    assert os.path.samefile(resolve_model_path("tiny-org/tiny-llama"), snap)
    assert os.path.samefile(resolve_model_path("tiny-org/tiny-llama@v1"), snap)
    assert os.path.samefile(resolve_model_path(f"tiny-org/tiny-llama@{COMMIT}"), snap)


def test_uncached_hub_id_offline_is_one_line(offline_hub, capsys):
    with pytest.raises(CheckpointError) as e:
        resolve_model_path("meta-llama/Llama-3.1-8B-Instruct")
    msg = str(e.value)
    assert "\n" not in msg and "not in the Hugging Face cache" in msg and "HF_HUB_OFFLINE" in msg
    assert offline_hub in msg
    with pytest.raises(CheckpointError, match="at revision v2"):
        resolve_model_path("meta-llama/Llama-3.1-8B-Instruct@v2")
    # the same from the commands
    with open("x.json", "w") as f:
        json.dump([], f)
    for argv in (
        ["import", "--hf", "meta-llama/Llama-3.1-8B-Instruct", "--out", "ckpt"],
        ["generate", "--model", "meta-llama/Llama-3.1-8B-Instruct", "--prompt", "hi"],
        ["eval", "--model", "org/policy", "--benchmark", "p-soups=x.json", "--out", "r.json"],
    ):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "not in the Hugging Face cache" in err, (argv, err)
    assert not os.path.exists("ckpt")


def test_missing_local_path_names_it(offline_hub, capsys):
    assert main(["import", "--hf", "./no/such/model", "--out", "ckpt"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "./no/such/model" in err and "Hugging Face" not in err
    assert main(["generate", "--model", "nomodel", "--prompt", "hi"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nomodel" in err and "Hugging Face" not in err


def test_import_generate_from_hub_id(tiny_hf_checkpoints, offline_hub, tmp_path, capsys):
    fill_hub_cache(offline_hub, "tiny-org/tiny-qwen", tiny_hf_checkpoints["qwen2"])
    from alignx_jax.generate import load_model_and_tokenizer
    from alignx_jax.models.hf import load_pretrained
    from alignx_jax.models.safetensors_io import SafetensorsReader

    ckpt = tmp_path / "ckpt"
    assert main(["import", "--hf", "tiny-org/tiny-qwen", "--out", str(ckpt)]) == 0
    assert "imported tiny-org/tiny-qwen" in capsys.readouterr().out
    base = json.loads((ckpt / "alignx_base.json").read_text())
    assert base == {"base_model": "tiny-org/tiny-qwen", "license": "llama3.1"}
    assert (ckpt / "tokenizer.json").is_file()
    # generate/eval load the same weights through the hub id as through the folder
    model, tok = load_model_and_tokenizer("tiny-org/tiny-qwen")
    ref = SafetensorsReader(tiny_hf_checkpoints["qwen2"])
    import numpy as np

    emb = np.asarray(model.embed_tokens.embedding.get_value())
    assert np.array_equal(emb, ref.get("model.embed_tokens.weight")) and tok.eos_token_id is not None
    again = load_pretrained(resolve_model_path("tiny-org/tiny-qwen@main"), dtype="bfloat16")
    assert again.embed_tokens.embedding.get_value().dtype.name == "bfloat16"
