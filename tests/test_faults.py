"""Fault injection: nothing a crash, a full disk, a corrupt file or a diverged step does is lost or poisons a
later run (issue 18). Each test breaks one thing the way it breaks in the field and checks the exit status,
the one `alignx:` line, and that no file outside the command's own outputs changed.

Training runs are tiny (hidden 32, one 128-token bucket, a few steps) runs of the real CLI (`cli.main`), in
this process unless the fault needs a process of its own (a signal, a kill, a file-size limit, a second
holder of the workdir); those tests are `slow` (end-to-end), as is the soak test, which SIGKILLs a run and
its export at random moments.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import cli_env, run_cli

from alignx_jax.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.py")
SMALL = [
    "--config.model.init.hidden_size=32",
    "--config.model.init.intermediate_size=64",
    "--config.model.init.head_dim=8",
    "--config.data.synth_users=8",
    "--config.data.max_length=128",
    "--config.data.buckets=(128,)",
    "--config.loss.logps_chunk=64",
    "--config.train.global_batch=8",
    "--config.train.micro_batch=4",
    "--config.train.progress=false",
]


# ----------------------------------------------------------------------------- helpers


# `python -c SMALL_DISK -m alignx_jax ...`: writes past 200 KB fail with EFBIG, as a full disk fails them with
# ENOSPC (the limit and the ignored SIGXFSZ are set in a wrapper that then execs the CLI: no fork of pytest)
SMALL_DISK = (
    "import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000)); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


def _cmd(args):
    """`alignx ARGS` as a process of its own (for a signal, a kill or a file-size limit)."""
    return [sys.executable, "-m", "alignx_jax", *args]


def _train_args(w, steps=4, every=2, *extra):
    return [
        "train",
        f"--config={TINY}",
        f"--config.workdir={w}",
        *SMALL,
        f"--config.train.steps={steps}",
        f"--config.checkpoint.every_steps={every}",
        "--config.checkpoint.keep=3",
        *extra,
    ]


def _train(w, steps=4, every=2, *extra):
    return run_cli(_train_args(w, steps, every, *extra))


def _lines(text):
    return [ln for ln in text.strip().splitlines() if ln.strip()]


def _one_error(r, *needles):
    """Exit 1, exactly one `alignx: error:` line (the last), holding every needle; no traceback."""
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [ln for ln in _lines(r.stderr) if ln.startswith("alignx: error:")]
    assert len(errors) == 1 and _lines(r.stderr)[-1] == errors[0], r.stderr[-3000:]
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def _main_error(capsys, argv, *needles):
    """`main(argv)` in this process: exit 1 and one stderr line holding the needles."""
    code = main(argv)
    err = _lines(capsys.readouterr().err)
    assert code == 1 and len(err) == 1 and err[0].startswith("alignx: error:"), (code, err)
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


def _snapshot(root, skip=()):
    """{relative path: sha1} of every file under root, except under the `skip` folders."""
    out = {}
    skip = tuple(os.path.abspath(s) for s in skip)
    for d, _dirs, files in os.walk(root):
        if os.path.abspath(d).startswith(skip):
            continue
        for name in files:
            path = os.path.join(d, name)
            if os.path.abspath(path).startswith(skip):
                continue
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha1(f.read()).hexdigest()
    return out


def _losses(w):
    with open(os.path.join(w, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def _largest_data_file(step_dir):
    files = [
        os.path.join(d, n)
        for d, _, ns in os.walk(os.path.join(step_dir, "params"))
        for n in ns
        if os.sep + "d" + os.sep in os.path.join(d, n)
    ]
    return max(files, key=os.path.getsize)


def _steps(w):
    return sorted(int(s) for s in os.listdir(os.path.join(w, "checkpoints")) if s.isdigit())


def _all_finite_checkpoints(w):
    """Every saved step restores, verifies (checksums, finiteness) and holds finite params."""
    from flax import nnx

    from alignx_jax.models.checkpoint import load_checkpoint

    for step in _steps(w):
        model = load_checkpoint(str(w), step)
        for leaf in nnx.to_flat_state(nnx.state(model)):
            assert np.isfinite(np.asarray(leaf[1].get_value())).all(), (step, leaf[0])


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 (copied by the tests that break it)."""
    w = tmp_path_factory.mktemp("base") / "W"
    r = _train(w)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _steps(w) == [2, 4]
    return w


@pytest.fixture()
def run_copy(base_run, tmp_path):
    w = tmp_path / "W"
    shutil.copytree(base_run, w)
    return w


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A tiny random HF folder (our own export) with the shipped tokenizer."""
    from flax import nnx

    from alignx_jax.models.decoder import Decoder, DecoderConfig
    from alignx_jax.models.hf import save_hf
    from alignx_jax.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer

    tok = load_tokenizer()
    cfg = DecoderConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    out = tmp_path_factory.mktemp("hf") / "model"
    save_hf(Decoder(cfg, rngs=nnx.Rngs(0)), str(out), tokenizer_dir=TINY_TOKENIZER_DIR)
    return out


# ----------------------------------------------------------------------------- 1. non-finite steps


@pytest.mark.slow
def test_nan_run_stops_at_the_step_and_leaves_no_nonfinite_checkpoint(tmp_path):
    w = tmp_path / "W"
    r = _train(w, 8, 1, "--config.optim.lr=1e9")
    line = _one_error(r, "non-finite", "at step", "not saved", "last finite checkpoint: step")
    bad = int(line.split("at step ")[1].split(":")[0])
    assert _steps(w) and max(_steps(w)) == bad - 1, (line, _steps(w))
    assert f"last finite checkpoint: step {bad - 1}" in line
    _all_finite_checkpoints(w)
    # the newest checkpoint exports and the export is finite
    r = run_cli(["export", "--checkpoint", str(w), "--out", str(tmp_path / "hf")])
    assert r.returncode == 0, r.stderr[-2000:]
    from alignx_jax.models.hf import load_pretrained

    load_pretrained(str(tmp_path / "hf"))  # checks every tensor is finite


@pytest.mark.slow
def test_skip_policy_skips_counts_and_stops_after_max_in_a_row(tmp_path):
    w = tmp_path / "W"
    r = _train(
        w,
        12,
        2,
        "--config.optim.lr=1e9",
        "--config.loss.nan_policy=skip",
        "--config.loss.max_skipped_steps=3",
    )
    _one_error(r, "3 steps in a row", "loss.max_skipped_steps", "last finite checkpoint: step")
    recs = [json.loads(line) for line in open(w / "metrics.jsonl")]
    counts = [rec["skipped_nonfinite_steps"] for rec in recs]
    assert counts[0] == 0 and counts[-1] == 2 and counts == sorted(counts), counts
    _all_finite_checkpoints(w)


@pytest.mark.slow
def test_skip_policy_counts_the_skipped_steps_before_a_resume(tmp_path):
    """The steps skipped in a row before a stop count after the resume: the run stops where an
    uninterrupted one does (each rerun used to start the count again, walking past the limit)."""
    skip = ["--config.optim.lr=1e9", "--config.loss.nan_policy=skip", "--config.loss.max_skipped_steps=3"]
    skip += ["--config.optim.warmup_ratio=0", "--config.optim.min_lr_ratio=1"]  # one lr whatever train.steps
    whole = _one_error(_train(tmp_path / "A", 12, 1, *skip), "steps in a row up to step")
    w = tmp_path / "B"
    stop = int(whole.split("up to step ")[1].split(" ")[0].rstrip(";:,"))
    r = _train(w, stop - 1, 1, *skip)  # ends one step short of the limit, with steps skipped in a row
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = _one_error(_train(w, 12, 1, *skip), "steps in a row up to step")
    assert f"up to step {stop}" in resumed, (whole, resumed)


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_skip_policy_step_keeps_the_old_state():
    """In the jitted step: a non-finite update is flagged and, with nan_policy=skip, not applied."""
    import jax
    import jax.numpy as jnp
    import ml_collections
    from flax import nnx

    from alignx_jax import config_schema, train
    from alignx_jax.models.decoder import Decoder, DecoderConfig

    model = Decoder(
        DecoderConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
        ),
        rngs=nnx.Rngs(0),
    )
    codec = train.ParamsCodec.of(model)
    params = nnx.to_pure_dict(nnx.state(model))
    ref = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
    optim = ml_collections.ConfigDict(
        {
            "lr": 1e39,
            "warmup_ratio": 0.0,
            "min_lr_ratio": 1.0,
            "b1": 0.9,
            "b2": 0.95,
            "eps": 1e-8,
            "weight_decay": 0.0,
            "clip": 0.0,
        }
    )
    tx, _ = train.make_optimizer(optim, 10)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 50, size=(4, 12)).astype(np.int32)
    ones = np.ones((4, 12), np.int32)
    batch = train.to_microbatches(
        {
            "input_ids": ids,
            "attention_mask": ones,
            "loss_mask": ones,
            "positions": np.tile(np.arange(12, dtype=np.int32), (4, 1)),
            "pair_mask": np.ones((2,), np.int32),
        },
        1,
    )
    loss_cfg = config_schema.default_config().loss
    loss_cfg.update(logps_chunk=0, nan_policy="skip")
    step = jax.jit(train.make_train_step(codec, tx, loss_cfg, precomputed=False))
    opt = tx.init(params)
    p1, o1, m = step(jax.tree.map(jnp.copy, params), opt, ref, batch)
    assert int(m["nonfinite"]) == 4, (
        m
    )  # lr 1e39 is inf in float32: the loss and gradient are finite, the update not
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert train.describe_nonfinite(6) == "gradient norm, updated params"


# ----------------------------------------------------------------------------- 2. export


@pytest.mark.slow
def test_export_refuses_a_foreign_folder_and_overwrite_keeps_foreign_files(run_copy, tmp_path, caplog):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "my_other_model.safetensors").write_bytes(b"not ours" * 100)
    (out / "config.json").write_text('{"mine": true}')
    (out / "notes.txt").write_text("keep me")
    before = _snapshot(tmp_path, skip=[run_copy])
    r = run_cli(["export", "--checkpoint", str(run_copy), "--out", str(out)])
    _one_error(r, str(out), "not empty", "--overwrite")
    assert _snapshot(tmp_path, skip=[run_copy]) == before

    # other weights would be loaded by transformers instead of (or with) the export: refused, untouched
    r = run_cli(["export", "--checkpoint", str(run_copy), "--out", str(out), "--overwrite"])
    _one_error(r, str(out), "my_other_model.safetensors", "transformers would load")
    assert _snapshot(tmp_path, skip=[run_copy]) == before
    (out / "my_other_model.safetensors").unlink()
    r = run_cli(["export", "--checkpoint", str(run_copy), "--out", str(out), "--overwrite"])
    assert r.returncode == 0, r.stderr[-2000:]
    # a training step's params folder keeps its metadata one level up: nothing is missing, nothing said
    assert not [x for x in caplog.records if "Metadata file does not exist" in x.getMessage()]
    assert (out / "notes.txt").read_text() == "keep me"
    assert json.loads((out / "config.json").read_text()).get("mine") is None  # a file an export writes
    manifest = json.loads((out / "alignx_export.json").read_text())
    assert "notes.txt" not in manifest["files"] and "config.json" in manifest["files"]
    assert not [p for p in tmp_path.iterdir() if ".export-" in p.name]  # no temporary folder left

    # the same model again, into its own export: no flag needed; a stale shard of its own goes, others stay
    r = run_cli(
        ["export", "--checkpoint", str(run_copy), "--out", str(out), "--step", "2", "--shard-size", "200KB"]
    )
    assert r.returncode == 0, r.stderr[-2000:]
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and all("-of-" + shards[0].split("-of-")[1] in s for s in shards), shards
    assert (out / "notes.txt").exists()
    from alignx_jax.models.hf import load_pretrained

    load_pretrained(str(out))

    # another model into it: refused
    other = tmp_path / "other_ckpt"
    shutil.copytree(run_copy, other)
    r = run_cli(["export", "--checkpoint", str(other), "--out", str(out)])
    _one_error(r, "holds an export of", "--overwrite")


@pytest.mark.slow
def test_export_of_a_corrupt_or_nonfinite_checkpoint_is_one_line(run_copy, tmp_path, capsys):
    path = _largest_data_file(run_copy / "checkpoints" / "4")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2 : len(data) // 2 + 4096] = bytes(4096)  # 4 KiB overwritten, size unchanged
    open(path, "wb").write(bytes(data))
    before = _snapshot(tmp_path)
    _main_error(
        capsys,
        ["export", "--checkpoint", str(run_copy), "--out", str(tmp_path / "hf")],
        "checkpoints/4",
        "params",
    )
    assert not (tmp_path / "hf").exists() and _snapshot(tmp_path) == before
    # an orbax model checkpoint holding NaN: export, generate and eval refuse it in one line
    import orbax.checkpoint as ocp

    from alignx_jax.models import checkpoint

    model = checkpoint.load_checkpoint(str(run_copy), 2)
    bad = tmp_path / "nan_ckpt"
    checkpoint.save_checkpoint(model, str(bad), tokenizer_dir=str(run_copy / "reference"))
    from flax import nnx

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params["norm"]["scale"] = params["norm"]["scale"] * np.nan
    with ocp.StandardCheckpointer() as ck:
        ck.save(os.path.join(bad, "params"), params, force=True)
    _main_error(
        capsys, ["export", "--checkpoint", str(bad), "--out", str(tmp_path / "hf2")], "norm/scale", "NaN"
    )
    _main_error(
        capsys, ["generate", "--model", str(bad), "--prompt", "hi", "--max-new-tokens", "2"], "norm/scale"
    )


def _other_finite_params_at_step_4(run_copy) -> None:
    """Step 4's params replaced by other finite values: only its saved checksums tell them apart."""
    import orbax.checkpoint as ocp
    from flax import nnx

    from alignx_jax.models import checkpoint

    model = checkpoint.load_checkpoint(str(run_copy), 4)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params["norm"]["scale"] = params["norm"]["scale"] + 1.0
    with ocp.StandardCheckpointer() as ck:
        ck.save(str(run_copy / "checkpoints" / "4" / "params"), params, force=True)


def test_export_of_a_step_whose_meta_is_gone_is_one_line_naming_it(run_copy, tmp_path, capsys):
    _other_finite_params_at_step_4(run_copy)
    _main_error(
        capsys,
        ["export", "--checkpoint", str(run_copy), "--out", str(tmp_path / "hf")],
        "norm/scale",
        "checksum",
    )
    # without the meta that holds those checksums the step is refused as train refuses it, not exported
    meta = run_copy / "checkpoints" / "4" / "meta" / "metadata"
    meta.unlink()
    _main_error(capsys, ["export", "--checkpoint", str(run_copy), "--out", str(tmp_path / "hf")], str(meta))
    _main_error(
        capsys, ["generate", "--model", str(run_copy), "--prompt", "hi", "--max-new-tokens", "2"], str(meta)
    )
    assert not (tmp_path / "hf").exists()
    assert main(["export", "--checkpoint", str(run_copy), "--step", "2", "--out", str(tmp_path / "hf")]) == 0


def test_export_of_params_without_their_orbax_metadata_is_one_line(run_copy, tmp_path, capsys):
    # the file the stored dtypes are read from deleted: the checksums must still be checked, or these
    # weights are exported as step 4's
    _other_finite_params_at_step_4(run_copy)
    gone = run_copy / "checkpoints" / "4" / "params" / "_METADATA"
    gone.unlink()
    out = ["export", "--checkpoint", str(run_copy), "--out", str(tmp_path / "hf")]
    _main_error(capsys, out, str(gone))
    # a zeroed manifest: orbax's own warning is not a second line before the error
    os.truncate(run_copy / "checkpoints" / "2" / "params" / "manifest.ocdbt", 0)
    _main_error(capsys, [*out, "--step", "2"], "checkpoints/2/params")
    assert not (tmp_path / "hf").exists()


def test_a_checkpoint_loaded_in_another_dtype_is_still_checked_against_its_checksums(run_copy, capsys):
    import orbax.checkpoint as ocp
    from flax import nnx

    from alignx_jax.errors import CheckpointError
    from alignx_jax.models import checkpoint

    good = checkpoint.load_checkpoint(str(run_copy), 4)
    want = nnx.to_pure_dict(nnx.state(good, nnx.Param))
    half = checkpoint.load_checkpoint(str(run_copy), 4, dtype="bfloat16")
    got = nnx.to_pure_dict(nnx.state(half, nnx.Param))
    assert got["norm"]["scale"].dtype == np.dtype("bfloat16")
    np.testing.assert_array_equal(
        np.asarray(got["embed_tokens"]["embedding"]),
        np.asarray(want["embed_tokens"]["embedding"].astype("bfloat16")),
    )
    # a weight float16 cannot hold is named, not loaded as inf
    state = nnx.state(good, nnx.Param)
    big = nnx.to_pure_dict(state)
    big["norm"]["scale"] = big["norm"]["scale"] * 0 + 1e6
    nnx.replace_by_pure_dict(state, big)
    nnx.update(good, state)
    checkpoint.save_checkpoint(good, str(run_copy.parent / "big"), tokenizer_dir=str(run_copy / "reference"))
    assert checkpoint.load_checkpoint(str(run_copy.parent / "big"), dtype="bfloat16") is not None
    with pytest.raises(CheckpointError, match="norm/scale holds NaN/inf"):
        checkpoint.load_checkpoint(str(run_copy.parent / "big"), dtype="float16")
    # other finite values under step 4's checksums: refused in bfloat16 (dtype=auto's pick on a GPU) too
    want["norm"]["scale"] = want["norm"]["scale"] + 1.0
    with ocp.StandardCheckpointer() as ck:
        ck.save(str(run_copy / "checkpoints" / "4" / "params"), want, force=True)
    for dtype in ("bfloat16", "float16"):
        with pytest.raises(CheckpointError, match="norm/scale does not match its checksum"):
            checkpoint.load_checkpoint(str(run_copy), 4, dtype=dtype)
    _main_error(
        capsys,
        [
            "generate",
            "--model",
            str(run_copy),
            "--dtype",
            "bfloat16",
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
        ],
        "norm/scale",
        "checksum",
    )


def test_loading_an_hf_folder_with_nonfinite_tensors_names_the_tensor(tiny_hf, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "nan_hf"
    shutil.copytree(tiny_hf, folder)
    shard = next(folder.glob("model-*.safetensors"))
    tensors = load_file(str(shard))
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] = np.inf
    save_file(tensors, str(shard), metadata={"format": "pt"})
    _main_error(
        capsys,
        ["generate", "--model", str(folder), "--prompt", "hi"],
        "model.layers.1.mlp.down_proj.weight",
        "NaN/inf",
    )
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    _main_error(
        capsys,
        [
            "eval",
            "--model",
            str(folder),
            "--benchmark",
            f"uf-p-4={bench}",
            "--method",
            "none",
            "--out",
            str(tmp_path / "r.json"),
        ],
        "model.layers.1.mlp.down_proj.weight",
    )
    assert not (tmp_path / "r.json").exists()


@pytest.mark.slow
def test_export_that_runs_out_of_space_leaves_the_previous_export(run_copy, tmp_path):
    out = tmp_path / "hf"
    r = run_cli(["export", "--checkpoint", str(run_copy), "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    before = _snapshot(tmp_path, skip=[run_copy])

    r = subprocess.run(
        [
            sys.executable,
            "-c",
            SMALL_DISK,
            *_cmd(["export", "--checkpoint", str(run_copy), "--out", str(out), "--step", "2"])[1:],
        ],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    _one_error(r, "export failed", "is unchanged")
    assert _snapshot(tmp_path, skip=[run_copy]) == before
    assert not [p for p in tmp_path.iterdir() if ".export-" in p.name]


@pytest.mark.slow
def test_export_out_under_a_file_is_one_line(run_copy, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    _main_error(
        capsys,
        ["export", "--checkpoint", str(run_copy), "--out", str(tmp_path / "afile" / "hf")],
        "afile",
        "cannot create",
    )
    _main_error(
        capsys, ["export", "--checkpoint", str(run_copy), "--out", str(tmp_path / "afile")], "is a file"
    )
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.slow
def test_disk_full_during_training_is_one_line_and_the_rerun_completes(tmp_path):
    w = tmp_path / "W"
    r = subprocess.run(
        [sys.executable, "-c", SMALL_DISK, *_cmd(_train_args(w))[1:]],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    line = _one_error(r, "File too large", str(w), "rerun the same command")
    assert ".safetensors" in line or "checkpoints" in line or "metrics" in line, line
    r = _train(w)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(_losses(w)) == [1, 2, 3, 4] and _steps(w) == [2, 4]


@pytest.mark.slow
@pytest.mark.parametrize("full_at", [2, 4])
def test_a_checkpoint_write_failing_in_the_background_is_one_line(
    base_run, tmp_path, monkeypatch, caplog, full_at
):
    """A full disk under an asynchronous save fails in orbax's background threads (the error meets the next
    save, or the wait at the end): one line, not their two logged tracebacks before it; the steps saved
    before stay, and the same command then ends where an uninterrupted run does."""
    from orbax.checkpoint._src.checkpointers import async_checkpointer

    from alignx_jax.checkpointing import saved_checksums

    commit = async_checkpointer._background_wait_for_commit_futures

    def disk_full_at_one_step(directory, *args, **kwargs):
        if os.path.basename(str(directory)).split(".")[0] == str(full_at):  # the step (or its tmp folder)
            raise OSError(errno.ENOSPC, "No space left on device", os.path.join(str(directory), "d"))
        return commit(directory, *args, **kwargs)

    monkeypatch.setattr(async_checkpointer, "_background_wait_for_commit_futures", disk_full_at_one_step)
    w = tmp_path / "W"
    r = _train(w)
    line = _one_error(r, "a checkpoint write failed", "No space left on device", str(w))
    assert re.findall(r"checkpoints/(\d+)", line) == [str(full_at)], line  # the step whose write failed
    logged = [rec.getMessage()[:200] for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert not logged, logged
    assert _steps(w) == [s for s in (2,) if s < full_at]
    monkeypatch.undo()
    r = _train(w)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(_losses(w)) == [1, 2, 3, 4] and _steps(w) == [2, 4]
    for item in ("params", "opt_state"):
        got, want = (saved_checksums(str(x / "checkpoints"), 4, item) for x in (w, base_run))
        assert got == want, item


def test_a_failed_background_checkpoint_write_stops_the_run_before_the_next_save(tmp_path, monkeypatch):
    """The write of step 8 fails in orbax's background threads: the run stops with the same one line within
    a step or so, not after training on to the next save at step 12; step 8's folder is never taken as a
    checkpoint, step 4's is kept, and the rerun resumes from it."""
    from orbax.checkpoint._src.checkpointers import async_checkpointer

    commit = async_checkpointer._background_wait_for_commit_futures

    def disk_full_at_step_8(directory, *args, **kwargs):
        if os.path.basename(str(directory)).split(".")[0] == "8":  # the step (or its tmp folder)
            raise OSError(errno.ENOSPC, "No space left on device", os.path.join(str(directory), "d"))
        return commit(directory, *args, **kwargs)

    monkeypatch.setattr(async_checkpointer, "_background_wait_for_commit_futures", disk_full_at_step_8)
    w = tmp_path / "W"
    r = _train(w, 12, 4)
    line = _one_error(r, "a checkpoint write failed", "No space left on device", str(w))
    assert re.findall(r"checkpoints/(\d+)", line) == ["8"], line
    assert max(_losses(w)) < 12 and _steps(w) == [4], (sorted(_losses(w)), _steps(w))
    monkeypatch.undo()
    r = _train(w, 12, 4)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(_losses(w)) == list(range(1, 13)) and _steps(w) == [4, 8, 12]


@pytest.mark.slow
def test_killed_export_is_recovered_by_the_next_one(run_copy, tmp_path, capsys):
    """A kill between the two renames leaves the old folder beside the target: the next export puts it back
    (and a half-written temporary folder of a dead export is removed)."""
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(run_copy), "--out", str(out)]) == 0
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    os.rename(out, tmp_path / f".hf.export-old-{pid}")
    (tmp_path / f".hf.export-tmp-{pid}").mkdir()
    (tmp_path / f".hf.export-tmp-{pid}" / "model-00001-of-00001.safetensors").write_bytes(b"half")
    (tmp_path / f".hf.tmp-{socket.gethostname()}-{pid}").mkdir()  # this version's name for it
    assert main(["export", "--checkpoint", str(run_copy), "--out", str(out), "--step", "2"]) == 0
    assert "restored" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["W", "hf"]
    assert json.loads((out / "alignx_export.json").read_text())["step"] == 2


# ----------------------------------------------------------------------------- 3-5. resume after damage


@pytest.mark.slow
def test_cut_metrics_line_is_dropped_with_a_warning(run_copy):
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.6')  # a kill mid-write
    r = _train(run_copy, 6, 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "metrics.jsonl: the last line is cut" in r.stderr
    assert sorted(_losses(run_copy)) == list(range(1, 7))

    from alignx_jax.metrics import read_metrics

    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')
    assert [rec["step"] for rec in read_metrics(str(run_copy))] == list(range(1, 7))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "overwrite", "meta"])
def test_damaged_newest_checkpoint_falls_back_one_step(run_copy, tmp_path, damage):
    path = _largest_data_file(run_copy / "checkpoints" / "4")
    if damage == "meta":  # valid JSON, one digit more: the loader would resume from another row
        meta = run_copy / "checkpoints" / "4" / "meta" / "metadata"
        text = meta.read_text()
        assert '"rows_seen": ' in text
        meta.write_text(text.replace('"rows_seen": ', '"rows_seen": 1', 1))
    elif damage == "truncate":
        os.truncate(path, os.path.getsize(path) // 3)
    else:
        data = bytearray(open(path, "rb").read())
        data[len(data) // 3 : len(data) // 3 + 4096] = os.urandom(4096)
        open(path, "wb").write(bytes(data))
    before = _snapshot(tmp_path, skip=[run_copy])
    r = _train(run_copy, 6, 2)
    assert r.returncode == 0, r.stderr[-3000:]
    warn = [ln for ln in _lines(r.stderr) if "warning:" in ln and "checkpoints/4" in ln]
    assert len(warn) == 1 and "resuming from step 2" in warn[0], r.stderr[-3000:]
    assert "pybind" not in warn[0] and "TensorStore({" not in warn[0]
    assert "resuming from" in r.stderr and "(step 2 of 6)" in r.stderr
    assert _steps(run_copy) == [2, 4, 6]  # 4 written again by the resumed run
    assert [p.name.split(".")[0] for p in (tmp_path / "W" / "checkpoints.bad").iterdir()] == ["4"]
    assert _snapshot(tmp_path, skip=[run_copy]) == before
    _all_finite_checkpoints(run_copy)


@pytest.mark.slow
def test_an_allowed_param_dtype_change_resumes_from_the_verified_newest_step(run_copy):
    # the saved float32 bits are checked against their checksums, then cast: not "corrupt data, delete them"
    r = _train(
        run_copy, 6, 2, "--config.model.param_dtype=bfloat16", "--config.train.allow_config_change=true"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(step 4 of 6)" in r.stderr and "moved to" not in r.stderr, r.stderr[-3000:]
    assert _steps(run_copy) == [2, 4, 6] and not (run_copy / "checkpoints.bad").exists()
    from alignx_jax.models.checkpoint import default_dtype

    assert default_dtype(str(run_copy), 6) == "bfloat16" and default_dtype(str(run_copy), 4) == "float32"


@pytest.mark.slow
def test_no_checkpoint_verifies_is_one_line(run_copy):
    for step in (2, 4):
        os.truncate(_largest_data_file(run_copy / "checkpoints" / str(step)), 100)
    r = _train(run_copy, 6, 2)
    _one_error(r, "no saved step verifies", "checkpoints/4", "delete")
    assert _steps(run_copy) == [2, 4]  # nothing moved when nothing verifies


# ----------------------------------------------------------------------------- 6. one line, not a traceback


def test_bad_bucket_value_is_one_line(tmp_path):
    from alignx_jax import train
    from alignx_jax.config import load_config
    from alignx_jax.errors import ConfigError

    cfg = load_config(TINY, [f"--config.workdir={tmp_path}/w", "--config.data.buckets=(256,'x',1024)"])
    with pytest.raises(ConfigError, match="data.buckets="):
        train.validate_config(cfg)
    (tmp_path / "afile").write_text("x")
    r = run_cli(["train", f"--config={TINY}", f"--config.workdir={tmp_path / 'afile'}"])
    _one_error(r, "afile", "is a file")
    assert (tmp_path / "afile").read_text() == "x"


def test_truncated_safetensors_is_one_line(tiny_hf, tmp_path, capsys):
    folder = tmp_path / "cut"
    shutil.copytree(tiny_hf, folder)
    shard = next(folder.glob("model-*.safetensors"))
    os.truncate(shard, os.path.getsize(shard) - 1000)
    _main_error(
        capsys, ["import", "--hf", str(folder), "--out", str(tmp_path / "ck")], shard.name, "truncated"
    )
    _main_error(capsys, ["generate", "--model", str(folder), "--prompt", "hi"], "truncated")
    assert not (tmp_path / "ck").exists()


# ----------------------------------------------------------------------------- 7. legal but useless inputs


def test_data_check_warns_on_chosen_equal_rejected_and_strict_fails(tmp_path, capsys):
    from test_schema import alignx_row, write_jsonl

    rng = np.random.default_rng(0)
    rows = [alignx_row(i, rng) for i in range(3)]
    rows[1]["rejected"] = rows[1]["chosen"]
    path = tmp_path / "d.jsonl"
    write_jsonl(path, rows)
    assert main(["data", "check", str(path)]) == 0
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("alignx: warning:") and "row 1" in err[0], err
    assert "chosen == rejected" in err[0] and str(path) in err[0]
    _main_error(capsys, ["data", "check", "--strict", str(path)], "row 1", "chosen == rejected")


def test_data_check_warns_on_duplicated_rows_and_strict_fails(tmp_path, capsys):
    """An exactly repeated row was not reported, and `data split --by row` can put its copies in both
    halves (a test row trained on): a warning naming the first copy, the row it repeats and the count."""
    import copy

    from test_schema import alignx_row, write_jsonl

    rng = np.random.default_rng(0)
    rows = [alignx_row(i, rng) for i in range(4)]
    rows[2], rows[3] = copy.deepcopy(rows[0]), copy.deepcopy(rows[0])
    path = tmp_path / "d.jsonl"
    write_jsonl(path, rows)
    assert main(["data", "check", str(path)]) == 0
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"alignx: warning: {path}, row 2: the same row as row 0,"), err
    assert "--by row" in err[0] and err[0].endswith("; 2 rows repeat an earlier row"), err
    _main_error(capsys, ["data", "check", "--strict", str(path)], "row 2", "the same row as row 0")
    # a copy in another file of a folder names that file; a row differing in one field is no copy
    folder = tmp_path / "f"
    folder.mkdir()
    other = copy.deepcopy(rows[1])
    other["chosen"] += " (edited)"
    write_jsonl(folder / "a.jsonl", rows[:2])
    write_jsonl(folder / "b.jsonl", [other, rows[1]])
    assert main(["data", "check", str(folder)]) == 0
    err = _lines(capsys.readouterr().err)
    assert (
        len(err) == 1
        and f"{folder / 'b.jsonl'}, row 1: the same row as row 1 of {folder / 'a.jsonl'}" in err[0]
    )
    assert "rows repeat" not in err[0], err
    write_jsonl(folder / "b.jsonl", [other])
    assert main(["data", "check", str(folder)]) == 0
    assert _lines(capsys.readouterr().err) == []


def test_generate_empty_prompt_is_one_line(tiny_hf, capsys):
    _main_error(
        capsys,
        ["generate", "--model", str(tiny_hf), "--prompt", "hello", "--prompt", "  "],
        "--prompt number 2 is empty",
    )


# ----------------------------------------------------------------------------- also: lock, config, reference


def test_a_held_flock_and_a_file_system_without_one_are_told_apart_alike(tmp_path, monkeypatch):
    """paths.try_flock classifies flock for the workdir lock and prepare's folder lock: held by another open
    file, both refuse (the workdir naming its recorded holder); no flock (ENOLCK), both go on, the workdir
    lock deciding by its recorded holder alone."""
    import errno
    import fcntl

    from alignx_jax import paths, workdir
    from alignx_jax.data import sources
    from alignx_jax.errors import AlignXError, DataError

    w = tmp_path / "W"
    w.mkdir()
    first = workdir.WorkdirLock(str(w))
    first.acquire()
    try:
        with pytest.raises(AlignXError, match=f"in use by alignx train pid {os.getpid()} "):
            workdir.WorkdirLock(str(w)).acquire()
    finally:
        first.release()
    fd = sources._lock_folder(str(tmp_path))
    try:
        with pytest.raises(DataError, match="another `alignx data prepare` is writing there"):
            sources._lock_folder(str(tmp_path))
    finally:
        os.close(fd)

    def flock_failing(code):
        def flock(fd, op):
            raise OSError(code, os.strerror(code))

        return flock

    monkeypatch.setattr(fcntl, "flock", flock_failing(errno.ENOLCK))
    fds = len(os.listdir("/proc/self/fd"))
    assert sources._lock_folder(str(tmp_path)) is None and len(os.listdir("/proc/self/fd")) == fds
    host = socket.gethostname()
    (w / "train.lock").write_text(json.dumps({"pid": os.getppid(), "host": host, "start": None}))
    with pytest.raises(AlignXError, match=f"in use by alignx train pid {os.getppid()} "):
        workdir.WorkdirLock(str(w)).acquire()
    (w / "train.lock").write_text("")
    lock = workdir.WorkdirLock(str(w))
    lock.acquire()
    assert json.loads((w / "train.lock").read_text())["pid"] == os.getpid()
    lock.release()
    monkeypatch.setattr(fcntl, "flock", flock_failing(errno.EACCES))  # some systems' "held" (flock(2))
    fd = os.open(w, os.O_RDONLY)
    try:
        with pytest.raises(paths.LockHeld):
            paths.try_flock(fd)
    finally:
        os.close(fd)


@pytest.mark.slow
def test_second_run_on_a_workdir_is_refused_and_a_dead_holders_lock_taken_over(tmp_path):
    w = tmp_path / "W"
    first = subprocess.Popen(
        _cmd(_train_args(w, 400, 1000)),
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (w / "metrics.jsonl").exists():
            assert first.poll() is None, "the first run ended early"
            time.sleep(0.1)
        r = _train(w, 400, 1000)
        _one_error(r, "in use by alignx train", f"pid {first.pid}", f"host {socket.gethostname()}")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert json.loads((w / "train.lock").read_text())["pid"] == first.pid  # left by the killed run
    r = _train(w, 2, 1000)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"taking over the lock of pid {first.pid}" in r.stderr
    assert (w / "train.lock").read_text() == ""  # released


@pytest.mark.slow
def test_resume_refuses_a_changed_config_unless_allowed(run_copy):
    before = (run_copy / "config.json").read_text()
    r = _train(run_copy, 6, 2, "--config.optim.lr=1e9", "--config.loss.beta=0.2")
    _one_error(r, "resuming with a different config", "loss.beta", "optim.lr", "allow_config_change")
    assert (run_copy / "config.json").read_text() == before and _steps(run_copy) == [2, 4]
    r = _train(run_copy, 6, 2, "--config.optim.lr=2e-3", "--config.train.allow_config_change=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warning: resuming with a changed config" in r.stderr and "optim.lr" in r.stderr
    assert json.loads((run_copy / "config.json").read_text())["optim"]["lr"] == 2e-3


@pytest.mark.slow
def test_a_failed_resume_leaves_the_config_of_its_checkpoints(run_copy):
    """A resume allowed to change the model that then restores no step: W/config.json still describes the
    checkpoints, so the original command resumes (it was rewritten first, and that command refused)."""
    before = (run_copy / "config.json").read_text()
    r = _train(
        run_copy, 6, 2, "--config.model.init.hidden_size=16", "--config.train.allow_config_change=true"
    )
    _one_error(r, "no saved step verifies")
    assert (run_copy / "config.json").read_text() == before
    r = _train(run_copy, 6, 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(step 4 of 6)" in r.stderr


def test_synthetic_users_cut_before_their_fingerprint_are_written_again(tmp_path, monkeypatch):
    """A kill after W/data was renamed into place but before W/data.fingerprint was written left data that
    no fingerprint names, which is kept as data from before fingerprints: a rerun with other synthetic users
    (no step saved yet, so no resume to refuse it) then trained on the killed run's users."""
    from alignx_jax import workdir as workdir_lib
    from alignx_jax.config import load_config
    from alignx_jax.data import sources
    from alignx_jax.train.setup import ensure_data

    class Killed(Exception):
        pass

    def killed(path, value):
        raise Killed(path)

    w = str(tmp_path / "W")
    cfg = lambda users: load_config(TINY, [f"--config.workdir={w}", f"--config.data.synth_users={users}"])
    with monkeypatch.context() as m:
        m.setattr(workdir_lib, "write_fingerprint", killed)
        with pytest.raises(Killed):
            ensure_data(cfg(4), w, True)
    data = ensure_data(cfg(8), w, True)
    rows = len(sources.open_source(data))
    assert rows == 8 * cfg(8).data.synth_pairs_per_user, rows
    assert os.path.isfile(data + ".fingerprint")  # named now: a later change of settings is seen


def test_resuming_on_other_synthetic_users_is_refused_even_when_allowed(tmp_path):
    """data.synth_users changed on resume with train.allow_config_change: W/data was rewritten under the
    checkpoints that trained on it and the resume then failed on the loader's row count; now one line,
    before W/data (or W/config.json) is touched. Another change the flag allows still resumes."""
    w = tmp_path / "w"
    assert _train(w, 2, 2).returncode == 0
    before = _snapshot(w / "data"), (w / "data.fingerprint").read_text(), (w / "config.json").read_text()
    r = _train(w, 4, 2, "--config.data.synth_users=16", "--config.train.allow_config_change=true")
    line = _one_error(
        r,
        f"{w}/config.json: resuming on other synthetic data: data.synth_users (8 -> 16)",
        f"trained on {w}/data",
        "fresh workdir",
    )
    assert "num_rows" not in line and "warning: resuming with a changed config" not in r.stderr, r.stderr
    assert (
        _snapshot(w / "data"),
        (w / "data.fingerprint").read_text(),
        (w / "config.json").read_text(),
    ) == before
    r = _train(w, 4, 2, "--config.optim.lr=2e-3", "--config.train.allow_config_change=true")
    assert r.returncode == 0 and "(step 2 of 4)" in r.stderr, r.stderr[-3000:]


def test_what_a_killed_run_left_aside_is_removed_when_the_workdir_is_next_taken(tmp_path):
    """A kill during the synthetic users' write (or config.json's, a fingerprint's, the metrics' cut-back, a
    derived array's) left its temporary beside it for ever; the next run on W removes those of pids gone from
    this host, and keeps a live one's, another host's (a shared file system) and any other name."""
    w = tmp_path / "w"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid, live = int(dead.stdout), os.getppid()
    w.mkdir()
    (w / f"data.tmp{pid}").mkdir()
    (w / f"data.tmp{pid}" / "data.parquet").write_bytes(b"half")
    (w / f"config.json.tmp{pid}").write_text("{")
    (w / f"data.fingerprint.tmp{pid}").write_text("")
    (w / f"data.tmp{live}").mkdir()
    (w / f"notes.tmp{pid}").write_text("mine")
    host = socket.gethostname()
    for name in ("data", "metrics.jsonl", "ref_logps.npy", "config.json.fingerprint"):  # this version's names
        (w / f".{name}.tmp-{host}-{pid}").write_text("half")
    (w / f".data.tmp-{host}-{live}").mkdir()
    (w / f".data.tmp-{host}x-{pid}").mkdir()  # another host's: its pid says nothing here
    r = _train(w, 1, 1)
    assert r.returncode == 0, r.stderr[-3000:]
    left = sorted(p.name for p in w.iterdir() if ".tmp" in p.name)
    assert left == [
        f".data.tmp-{host}-{live}",
        f".data.tmp-{host}x-{pid}",
        f"data.tmp{live}",
        f"notes.tmp{pid}",
    ], left
    assert (w / "data" / "data.parquet").is_file()


def test_every_temporary_a_killed_workdir_write_leaves_is_removed_by_the_next_run(tmp_path, monkeypatch):
    """Each writer into W, cut between its write and its rename (the kill), leaves a temporary of
    `paths.tmp_path`'s one pattern, which `remove_dead_tmp` removes once its pid is gone (the derived arrays'
    `X.npy.tmp.npy` and the metrics' `metrics.jsonl.tmp` were left for ever)."""
    from alignx_jax import workdir as workdir_lib
    from alignx_jax.metrics import MetricsWriter

    w = tmp_path / "w"
    w.mkdir()
    (w / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    writes = [
        lambda: workdir_lib.save_derived(str(w / "ref_logps.npy"), np.zeros(3), "k"),
        lambda: workdir_lib.write_json_atomic(str(w / "config.json"), {"a": 1}),
        lambda: workdir_lib.write_fingerprint(str(w / "data"), "k"),
        lambda: MetricsWriter(str(w), tensorboard=False, resume_step=1),
    ]

    def killed(src, dst):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(os, "getpid", lambda: int(dead.stdout))  # the writer is the process that is gone
        m.setattr(os, "replace", killed)
        m.setattr(os, "remove", lambda p: None)  # a killed process runs no clean-up: its temporary stays
        for write in writes:
            with pytest.raises(KeyboardInterrupt):
                write()
    left = sorted(p.name for p in w.iterdir() if p.name != "metrics.jsonl")
    assert len(left) == len(writes) and all(p.startswith(".") and ".tmp-" in p for p in left), left
    workdir_lib.remove_dead_tmp(str(w))
    assert sorted(p.name for p in w.iterdir()) == ["metrics.jsonl"]


def test_a_user_folder_as_workdir_is_refused_untouched(tmp_path):
    """A folder that is no run's (no lock, no run config.json) but holds names a run writes and replaces:
    one line, nothing touched; a folder of other files is a workdir, and they are kept."""
    w = tmp_path / "W"
    (w / "data").mkdir(parents=True)
    (w / "data" / "mine.csv").write_text("a,b\n")
    (w / "metrics.jsonl").write_text('{"step": 3}\n')
    before = _snapshot(tmp_path)
    line = _one_error(_train(w, 1, 1), "not an alignx run's folder", "data, metrics.jsonl")
    assert "choose a new or empty folder" in line and _snapshot(tmp_path) == before
    other = tmp_path / "O"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    r = _train(other, 1, 1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (other / "notes.txt").read_text() == "keep me" and (other / "checkpoints" / "1").is_dir()


@pytest.mark.slow
def test_precomputed_reference_is_recomputed_when_the_data_changes(tmp_path):
    w = tmp_path / "W"
    pre = ["--config.loss.reference=precomputed"]
    assert _train(w, 2, 100, *pre).returncode == 0
    table = np.load(w / "ref_logps.p0.npy")
    key = (w / "ref_logps.p0.npy.fingerprint").read_text()
    shutil.rmtree(w / "checkpoints")  # a fresh start in the same workdir, on other (same-sized) data
    (w / "metrics.jsonl").unlink()
    r = _train(w, 2, 100, *pre, "--config.data.synth_seed=7")
    assert r.returncode == 0, r.stderr[-3000:]
    again = np.load(w / "ref_logps.p0.npy")
    assert again.shape == table.shape and not np.allclose(again, table)
    assert (w / "ref_logps.p0.npy.fingerprint").read_text() != key


@pytest.mark.slow
def test_sigterm_during_start_up_exits_0(tmp_path):
    for k, wait_for in enumerate(("import", "lock")):
        w = tmp_path / f"W{k}"
        proc = subprocess.Popen(
            _cmd(_train_args(w, 4, 2)),
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        if wait_for == "import":
            time.sleep(1.5)  # jax is still importing
        else:
            deadline = time.time() + 120
            while time.time() < deadline and not (w / "train.lock").exists():
                time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (wait_for, proc.returncode, err[-3000:])
        assert "SIGTERM received" in err and "Traceback" not in err, err[-3000:]


# ----------------------------------------------------------------------------- soak


def _kill_when(proc, w, mode, rng):
    """SIGKILL `proc` at a moment chosen by `mode` (random: mostly in start-up; save: while orbax writes a
    checkpoint; steps: after 1-4 more logged steps); False when it ended first."""
    ckpts, metrics = os.path.join(w, "checkpoints"), os.path.join(w, "metrics.jsonl")

    def logged():
        try:
            with open(metrics, "rb") as f:
                return f.read().count(b"\n")
        except OSError:
            return 0

    deadline = time.time() + (rng.uniform(0.3, 6.0) if mode == "random" else 300)
    base, more = None, int(rng.integers(1, 5))
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        if (
            mode == "save"
            and os.path.isdir(ckpts)
            and any("orbax-checkpoint-tmp" in n for n in os.listdir(ckpts))
        ):
            break  # an orbax write is in progress
        if mode == "steps":
            base = logged() if base is None or not os.path.exists(metrics) else base
            if logged() >= base + more:
                time.sleep(rng.uniform(0.0, 0.05))
                break
        time.sleep(0.002 if mode == "save" else 0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


@pytest.mark.slow
def test_soak_sigkill_at_random_moments_then_resume_matches(tmp_path):
    """3 SIGKILLs of a training run (in start-up, mid-step, during a checkpoint write), each followed by a
    resume, then 3 of its export: the losses are the uninterrupted run's and the export always loads."""
    steps, t0 = 24, time.time()
    args = lambda w: _train_args(w, steps, 2)
    ref = tmp_path / "ref"
    r = run_cli(args(ref))
    assert r.returncode == 0, r.stderr[-3000:]
    rng = np.random.default_rng(18)
    w = tmp_path / "soak"
    modes = []
    for mode in ("random", "save", "steps"):
        proc = subprocess.Popen(
            _cmd(args(w)),
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        if not _kill_when(proc, str(w), mode, rng):
            err = proc.stderr.read()
            assert proc.returncode == 0 and "moved to" not in err, err[-3000:]
            break  # finished before the kill: the remaining kills go to the export
        modes.append(mode)
        proc.stderr.close()
    r = run_cli(args(w))
    assert r.returncode == 0 and "moved to" not in r.stderr, r.stderr[-3000:]  # no saved step was damaged
    want, got = _losses(ref), _losses(w)
    assert sorted(got) == list(range(1, steps + 1))
    assert abs(got[steps] - want[steps]) < 1e-4, (got[steps], want[steps])

    from alignx_jax.models.hf import load_pretrained

    out = tmp_path / "hf"
    export = ["export", "--checkpoint", str(w), "--out", str(out)]
    kills = len(modes)
    for k in range(max(3, 6 - kills)):
        proc = subprocess.Popen(
            _cmd(export + (["--step", str(steps - 2)] if k % 2 else [])),
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
        )
        if k % 2:
            time.sleep(rng.uniform(0.5, 5.0))
        else:  # while it writes the new folder beside the old one
            deadline = time.time() + 120
            while (
                time.time() < deadline
                and proc.poll() is None
                and not any(p.name.startswith(".hf.tmp-") for p in tmp_path.iterdir())
            ):
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        if out.exists():  # never half an export: the old folder or the new one
            load_pretrained(str(out))
    r = run_cli(export)
    assert r.returncode == 0, r.stderr[-3000:]
    load_pretrained(str(out))
    print(
        f"soak: {len(modes)} training kills ({', '.join(modes)}), {kills - len(modes)} export kills, "
        f"{time.time() - t0:.0f}s"
    )
    assert len(modes) == 3 and kills >= 6


def test_missing_metadata_is_still_reported_outside_a_checkpoint_step(tmp_path):
    """The quieted orbax notice is only the item folder's: a folder whose step has no metadata either (a
    half-written or foreign folder) is still reported."""
    import logging

    from alignx_jax.checkpointing import _ItemMetadataNotice

    def kept(folder):
        path = str(folder / "params" / "_CHECKPOINT_METADATA")
        record = logging.LogRecord(
            "absl", logging.WARNING, "x", 1, "Metadata file does not exist: %s", (path,), None
        )
        return _ItemMetadataNotice().filter(record)

    step = tmp_path / "checkpoints" / "7"
    (step / "params").mkdir(parents=True)
    assert kept(step)  # nothing above it either
    (step / "_CHECKPOINT_METADATA").write_text("{}")
    assert not kept(step)  # the step's own metadata: the item folder lacks nothing


@pytest.mark.parametrize("key", ["model.hf_path", "model.tokenizer"])
def test_a_missing_model_folder_names_the_key_that_gave_it(tmp_path, capsys, key):
    missing = tmp_path / "nope"
    argv = ["train", f"--config={TINY}", f"--config.workdir={tmp_path / 'w'}", f"--config.{key}={missing}"]
    assert main(argv) == 1
    errors = [x for x in _lines(capsys.readouterr().err) if x.startswith("alignx: error:")]
    assert errors == [f"alignx: error: {key}: folder not found: {missing}"]


@pytest.mark.parametrize(
    "argv",
    [
        ["synth", "--out", "{f}", "--users", "4"],
        ["synth", "--out", "{f}/sub", "--users", "4"],
    ],
)
def test_an_output_the_system_refuses_is_one_line(tmp_path, capsys, argv):
    """A file where the command makes a folder (or a read-only place): one line naming --out (it was the OS
    error, "File exists" or "Not a directory", naming no flag)."""
    f = tmp_path / "afile"
    f.write_text("mine")
    line = _main_error(capsys, [a.format(f=f) for a in argv], str(f), "--out")
    assert "is a file, not a folder" in line or "a file where a folder would go" in line, line
    assert f.read_text() == "mine"


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig, code, says", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "stopped")]
)
def test_a_signal_ends_a_command_other_than_train_at_once(tmp_path, sig, code, says):
    """`alignx synth` (as every command but train, demo and plan): one line, 128 + the signal, and no
    output under its name (a KeyboardInterrupt inside JAX's GC callback used to be ignored)."""
    out = tmp_path / "synth"
    proc = subprocess.Popen(
        [sys.executable, "-m", "alignx_jax", "synth", "--out", str(out), "--users", "50000"],
        env=cli_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(3)  # past the imports, into the generation
    assert proc.poll() is None, "synth ended before the signal"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert (
        proc.returncode == code
        and err.strip()
        == f"alignx: {says}"
        + ("" if sig == signal.SIGINT else " by SIGTERM")
        + "; rerun the same command to resume or redo it"
    ), err
    assert not (out / "data.parquet").exists()


@pytest.mark.slow
def test_a_second_ctrl_c_in_a_step_exits_130(tmp_path):
    """Two Ctrl-C in the first step (its compile): the second stops at once, one line, exit 130. The
    interrupt cut a computation XLA's threads still ran, and the interpreter's teardown crashed on it
    (exit 139, 'Segmentation fault'). Twice: it did not crash every time."""
    env = {k: v for k, v in cli_env().items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["ALIGNX_COMPILE_CACHE"] = "0"  # the step compiles (a cached program loads too fast to be cut)
    for attempt in range(2):
        w = tmp_path / f"w{attempt}"
        proc = subprocess.Popen(
            _cmd(_train_args(w, 50, 50)),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline and not (w / "config.json").exists():
            time.sleep(0.005)  # written at the restore, just before the first step compiles
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        lines = _lines(err)
        # a second Ctrl-C that came after the first step's save (a loaded machine) ends it as the first did
        assert (proc.returncode, lines[-1]) == (130, "alignx: interrupted") or (
            proc.returncode == 0 and "SIGINT received: saved step" in lines[-1]
        ), (proc.returncode, err[-2000:])
        assert "Traceback" not in err and "Fatal Python error" not in err, err[-2000:]
        assert (w / "train.lock").read_text() == ""  # released on the way out


def test_a_users_data_folder_in_the_workdir_is_an_input_not_a_clash(tmp_path):
    """W/data is the run's own only when it writes synthetic users there; with data.train set it is the
    user's input and the folder is a workdir."""
    from alignx_jax.errors import ConfigError
    from alignx_jax.workdir import check_run_folder

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rows.jsonl").write_text("{}\n")
    check_run_folder(str(tmp_path), writes_data=False)
    with pytest.raises(ConfigError, match="holds data, which a run writes"):
        check_run_folder(str(tmp_path), writes_data=True)


def test_a_resume_takes_its_inputs_in_any_spelling_and_refuses_other_ones(tmp_path, monkeypatch):
    """W/config.json records data.train and model.hf_path as given: a resume naming the same file absolute,
    relative, through a link or with a trailing '/' was 'resuming with a different config'; another file,
    or another hub id, still is."""
    from alignx_jax.errors import ConfigError
    from alignx_jax.workdir import check_config_change

    (tmp_path / "data").mkdir()
    for name in ("d.jsonl", "e.jsonl"):
        (tmp_path / "data" / name).write_text("{}\n")
    (tmp_path / "link").symlink_to(tmp_path / "data")
    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    w = tmp_path / "w"
    w.mkdir()

    def config(train: str, hf_path: str) -> dict:
        return {
            "data": {"train": train},
            "model": {"hf_path": hf_path, "tokenizer": None},
            "loss": {"beta": 0.1},
        }

    (w / "config.json").write_text(json.dumps(config("data/d.jsonl", "m")))
    for train, hf_path in (
        (str(tmp_path / "data" / "d.jsonl"), str(tmp_path / "m") + "/"),
        ("link/d.jsonl", "./m"),
        ("./data//d.jsonl", "link/../m"),
    ):
        assert check_config_change(str(w), config(train, hf_path), allow=False) == []
    with pytest.raises(ConfigError, match=r"data.train \('data/d.jsonl' -> 'link/e.jsonl'\)"):
        check_config_change(str(w), config("link/e.jsonl", "m"), allow=False)
    (w / "config.json").write_text(json.dumps(config("data/d.jsonl", "org/a")))
    with pytest.raises(ConfigError, match=r"model.hf_path \('org/a' -> 'org/b'\)"):
        check_config_change(str(w), config("data/d.jsonl", "org/b"), allow=False)


def test_a_workdir_inside_a_runs_own_folders_is_refused(tmp_path):
    """W/checkpoints of another run (or a folder inside it) as a workdir: the new run's files land among
    that run's checkpoints."""
    import json

    from alignx_jax.errors import ConfigError
    from alignx_jax.workdir import check_run_folder

    run = tmp_path / "run"
    (run / "checkpoints" / "2").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": {}}))
    for name in ("checkpoints", "tensorboard", "reference"):
        with pytest.raises(ConfigError, match=f"^workdir .*: the {name}/ folder of the run in "):
            check_run_folder(str(run / name))
        # deeper too: a workdir W/checkpoints/x/w was taken
        with pytest.raises(
            ConfigError, match=f"^workdir .*: inside the {name}/ folder of the run in {run}, "
        ):
            check_run_folder(str(run / name / "new" / "w"))
    check_run_folder(str(run / "other"))  # any other sub-folder is a workdir of its own
    check_run_folder(str(run / "other" / "checkpoints" / "w"))  # run/other is no run
    check_run_folder(str(tmp_path / "checkpoints"))  # tmp_path is no run


def test_a_dangling_symlink_workdir_is_named_as_one(tmp_path, capsys):
    """A workdir that is a symlink to a missing folder: mkdir's 'cannot create it (File exists)' named
    neither the link nor its target."""
    w, target = tmp_path / "w", tmp_path / "gone" / "run"
    w.symlink_to(target)
    _main_error(
        capsys,
        _train_args(w, 1, 1),
        f"workdir {w}: a symlink to a missing {target}; create that folder or choose another workdir",
    )
    assert w.is_symlink() and not (tmp_path / "gone").exists()


def test_a_dangling_symlink_above_the_workdir_is_named_as_one(tmp_path, capsys):
    """A symlink to a missing folder partway up the workdir's path (runs/a/w, runs a dangling link):
    mkdir's 'cannot create it (File exists)' named neither the link nor its target."""
    link, target = tmp_path / "runs", tmp_path / "gone" / "runs"
    link.symlink_to(target)
    w = link / "a" / "w"
    _main_error(
        capsys,
        _train_args(w, 1, 1),
        f"workdir {w}: {link} is a symlink to a missing {target}; create that folder or choose another workdir",
    )
    assert link.is_symlink() and not (tmp_path / "gone").exists()


@pytest.mark.parametrize(
    "code, hint",
    [
        ("EACCES", "give this user access to it (or choose another workdir), then rerun the same command"),
        ("EROFS", "choose a workdir on a writable file system"),
    ],
)
def test_a_workdir_that_cannot_be_written_says_so_not_rerun(tmp_path, capsys, monkeypatch, code, hint):
    """A workdir this user may not write (or on a read-only file system): its line ended 'rerun the same
    command to resume', which fails the same way. (As root, chmod stops nothing: the write is refused
    as the kernel refuses it.)"""
    import errno

    w = tmp_path / "w"
    w.mkdir()
    real_open = os.open

    def refused(path, *a, **k):
        if os.fspath(path).startswith(str(w)):
            raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)), os.fspath(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", refused)
    line = _main_error(capsys, _train_args(w, 1, 1), f"{w}/train.lock: {os.strerror(getattr(errno, code))}")
    assert line.endswith(f"; the run stopped ({hint})") and "resume" not in line, line
