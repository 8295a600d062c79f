"""A gs:// workdir, model or results path stays a URL through metrics, workdir, checkpointing, eval and
export: every file goes through etils.epath, nothing becomes `<cwd>/gs:/...` (os.path.abspath).

The stand-in bucket: `epath.testing.mock_epath` routes every epath call on a `gs://` path to a local
folder, so the code runs the same path API it runs against Cloud Storage.
"""

from __future__ import annotations

import json
import os
import socket
import types

import pytest
from etils import epath
from etils.epath import testing as epath_testing

from alignx_jax import paths

BUCKET = "gs://alignx-test-bucket"


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """gs://alignx-test-bucket/... -> tmp_path/gcs/alignx-test-bucket/... for every epath operation."""
    root = tmp_path / "gcs"
    root.mkdir()
    monkeypatch.chdir(tmp_path)  # a path mistaken for a local one would land here, as tmp_path/gs:/...
    seen: list[str] = []
    written: list[str] = []  # URLs opened for writing, made, renamed to or removed
    readonly: list[str] = []  # URL prefixes whose writes are refused as Cloud Storage does (403)

    def local(p):
        s = os.fspath(p)
        if s.startswith("gs://"):
            seen.append(s)
            return str(root / s[len("gs://") :])
        return s

    def writes(p):
        s = os.fspath(p)
        if s.startswith("gs://"):
            written.append(s)
            if s.startswith(tuple(readonly)):  # gcsfs's words for a 403
                raise OSError(f"Forbidden: {s[5:]}\n403 caller does not have storage.objects.create access")

    def one(fn, p, *a, **kw):
        mode = str(a[0] if a else kw.get("mode", "r"))
        if fn.__name__ in ("makedirs", "mkdir", "remove", "rmtree") or (
            fn.__name__ == "open" and any(c in mode for c in "wax+")
        ):
            writes(p)
        return fn(local(p), *a, **kw)

    def two(fn, p, dst, *a, **kw):
        writes(dst)
        return fn(local(p), local(dst), *a, **kw)

    def glob(fn, p):
        return [BUCKET + "/" + os.path.relpath(x, root / BUCKET[5:]) for x in fn(local(p))]

    with epath_testing.mock_epath(
        open=one,
        exists=one,
        isdir=one,
        listdir=one,
        makedirs=one,
        mkdir=one,
        remove=one,
        rmtree=one,
        stat=one,
        walk=one,
        glob=glob,
        rename=two,
        replace=two,
        copy=two,
    ):
        yield types.SimpleNamespace(
            root=root, seen=seen, written=written, readonly=readonly, local=lambda u: root / u[len("gs://") :]
        )
    assert not (tmp_path / "gs:").exists(), "a gs:// path was used as a local path"


def test_paths_keep_urls():
    assert paths.absolute(f"{BUCKET}/w") == f"{BUCKET}/w"
    assert paths.absolute("rel/w") == os.path.abspath("rel/w")
    assert str(paths.path(f"{BUCKET}/w") / "x") == f"{BUCKET}/w/x"
    assert isinstance(paths.path(f"{BUCKET}/w"), epath.Path)


def test_metrics_on_a_bucket(fake_gcs):
    from alignx_jax.metrics import MetricsWriter, read_metrics

    w = f"{BUCKET}/run"
    m = MetricsWriter(w, tensorboard=False)
    m.write(1, {"loss": 0.5})
    m.write(2, {"loss": float("nan")})
    m.close()
    assert [r["step"] for r in read_metrics(w)] == [1, 2]
    m = MetricsWriter(w, tensorboard=False, resume_step=1)  # a resume drops the steps after its checkpoint
    m.write(2, {"loss": 0.25})
    m.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(w)] == [(1, 0.5), (2, 0.25)]
    assert (fake_gcs.local(w) / "metrics.jsonl").is_file()


def test_metrics_on_a_bucket_are_rewritten_at_most_every_30_seconds(fake_gcs, monkeypatch):
    """An object cannot be appended to: metrics.jsonl was rewritten whole at every logged step (O(steps^2)
    bytes, past Cloud Storage's one write a second to an object). Now: at most every 30 s, at `flush` (a
    checkpoint save) and at `close`."""
    from alignx_jax import metrics
    from alignx_jax.metrics import MetricsWriter, read_metrics

    clock = [1000.0]
    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    w = f"{BUCKET}/run"
    m = MetricsWriter(w, tensorboard=False)

    def uploaded():
        return [r["step"] for r in read_metrics(w)]

    for step in range(1, 6):
        clock[0] += 1
        m.write(step, {"loss": 0.5})
    assert uploaded() == []
    clock[0] += 30
    m.write(6, {"loss": 0.5})
    assert uploaded() == [1, 2, 3, 4, 5, 6]
    m.write(7, {"loss": 0.5})
    assert uploaded() == [1, 2, 3, 4, 5, 6]
    m.flush()
    assert uploaded() == [1, 2, 3, 4, 5, 6, 7]
    m.write(8, {"loss": 0.5})
    m.close()
    assert uploaded() == list(range(1, 9))


def test_tensorboard_on_a_bucket_without_its_client_is_one_warning(fake_gcs, monkeypatch, capsys):
    """tensorboardX on gs:// without google-cloud-storage raised an ImportError that was taken for 'no
    tensorboardX' (silence), and its half-made writer printed a traceback from __del__. Now: one warning
    line per URL naming the extra, no writer made; metrics.jsonl is written as before."""
    import gc
    import sys

    from alignx_jax import metrics
    from alignx_jax.metrics import MetricsWriter, read_metrics

    monkeypatch.setitem(sys.modules, "google.cloud.storage", None)  # `import google.cloud.storage` fails
    monkeypatch.setattr(metrics, "_TB_WARNED", set(), raising=False)
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    w = f"{BUCKET}/run"
    for _ in range(2):  # a second writer on the same workdir does not warn again
        m = MetricsWriter(w, resume_step=0)
        assert m._tb is None
        m.write(1, {"loss": 0.5})
        m.close()
    gc.collect()
    assert unraisable == []
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"alignx: warning: no TensorBoard events in {w}/tensorboard (tensorboardX needs google-cloud-storage: "
        "pip install -e '.[gcs]'); metrics.jsonl has every step"
    ], err
    assert [r["step"] for r in read_metrics(w)] == [1]
    assert not (fake_gcs.local(w) / "tensorboard").exists()
    # a scheme tensorboardX does not know it would write to a local folder named `az:`
    assert "only gs:// and s3://" in metrics.url_tensorboard_problem("az://c/run/tensorboard")


def test_workdir_files_and_lock_on_a_bucket(fake_gcs):
    from alignx_jax import workdir as wd

    w = f"{BUCKET}/run"
    paths.path(w).mkdir(parents=True, exist_ok=True)
    wd.write_json_atomic(f"{w}/config.json", {"a": 1})
    assert wd.read_saved_config(w) == {"a": 1}
    wd.write_fingerprint(f"{w}/config.json", "k1")
    assert wd.fingerprint_matches(f"{w}/config.json", "k1")
    assert not wd.fingerprint_matches(f"{w}/config.json", "k2")
    wd.forget_fingerprint(f"{w}/config.json")
    assert not wd.fingerprint_matches(f"{w}/config.json", "k1")
    lock = wd.WorkdirLock(w)
    lock.acquire()
    held = json.loads((fake_gcs.local(w) / wd.LOCK_FILE).read_text())
    assert held["pid"] == os.getpid()
    lock.release()
    assert (fake_gcs.local(w) / wd.LOCK_FILE).read_text() == ""


def test_a_bucket_lock_is_refreshed_and_a_stale_one_of_another_host_taken_over(fake_gcs, monkeypatch, capsys):
    """A pod preempted and recreated has other host names, so a dead run's lock on a bucket could not be
    told from a live one's (a rerun was refused until train.lock was deleted): the holder refreshes it, and
    another host's lock not refreshed for URL_LOCK_STALE_SECONDS is taken over with a warning."""
    import time

    from alignx_jax import workdir as wd
    from alignx_jax.errors import AlignXError

    w = f"{BUCKET}/pod"
    paths.path(w).mkdir(parents=True, exist_ok=True)
    lock_file = fake_gcs.local(w) / wd.LOCK_FILE

    def other(age):
        t = time.time() - age
        lock_file.write_text(
            json.dumps({"pid": 4242, "host": "t1v-gone-w-0", "time": t - 99, "refreshed": t})
        )

    other(60)  # a live run elsewhere (refreshed a minute ago)
    with pytest.raises(AlignXError, match="pid 4242 on host t1v-gone-w-0.*not refreshed for 10 minutes"):
        wd.WorkdirLock(w).acquire()
    other(wd.URL_LOCK_STALE_SECONDS + 5)
    lock = wd.WorkdirLock(w)
    lock.acquire()
    assert (
        "taking over the lock of pid 4242 on host t1v-gone-w-0, not refreshed for 60"
        in capsys.readouterr().err
    )
    held = json.loads(lock_file.read_text())
    assert held["pid"] == os.getpid() and lock._refresher.is_alive()
    first = held["refreshed"]
    time.sleep(0.01)
    lock.refresh()  # what the thread does every URL_LOCK_REFRESH_SECONDS
    assert json.loads(lock_file.read_text())["refreshed"] > first
    lock.release()
    assert lock_file.read_text() == "" and not lock._refresher.is_alive()


def test_checkpointer_and_checksums_keep_the_url(fake_gcs, monkeypatch):
    import orbax.checkpoint as ocp

    from alignx_jax import checkpointing as ck

    opened = []

    class FakeManager:  # orbax itself writes gs:// through tensorstore; here only the path is checked
        def __init__(self, directory, **kw):
            opened.append(os.fspath(directory))

    monkeypatch.setattr(ocp, "CheckpointManager", FakeManager)
    c = ck.TrainCheckpointer(f"{BUCKET}/run/checkpoints")
    assert c.directory == f"{BUCKET}/run/checkpoints" and opened == [f"{BUCKET}/run/checkpoints"]
    meta = fake_gcs.local(f"{BUCKET}/run/checkpoints") / "3" / "meta"
    meta.mkdir(parents=True)
    (meta / "metadata").write_text(json.dumps({"checksums": {"params": {"w": "abc"}}}))
    assert ck.saved_checksums(f"{BUCKET}/run/checkpoints", 3, "params") == {"w": "abc"}
    assert ck.saved_checksums(f"{BUCKET}/run/checkpoints", 4, "params") is None
    assert not c.has_head(3)


def test_eval_per_example_file_on_a_bucket(fake_gcs):
    from alignx_jax.evaluate import PerExampleLog

    url = f"{BUCKET}/eval/per.jsonl"
    row = {"benchmark": "p-soups", "persona": None, "index": 0, "logp_chosen": -1.0}
    log = PerExampleLog(url)
    assert log.path == url
    log.append([row, {**row, "index": 1}])
    log.close()
    again = PerExampleLog(url, write=False)  # another process of a multi-process eval: reads only
    assert len(again.rows) == 2
    assert len((fake_gcs.local(url)).read_text().splitlines()) == 2
    from alignx_jax.evaluate.scoring import StoredScores

    stored = StoredScores(
        url
    )  # `eval --reference-scores gs://...`: the file eval wrote there (was "no such file")
    assert len(stored.rows) == 2


def test_eval_out_on_a_bucket_is_probed_first_and_written_in_place(fake_gcs, monkeypatch, capsys):
    """`alignx eval --out gs://...`: a bucket that refuses writes is one error line before the evaluation
    (it was found after it, check_writable leaving URLs alone); a writable one gets RESULTS.json in place,
    with no `r.json.tmp` object, and the probe object is gone."""
    from alignx_jax.cli import main
    from alignx_jax.evaluate import cli as eval_cli

    runs = []

    def evaluate(*a, **kw):  # the evaluation itself is not what is tested: it records that it ran
        runs.append(a)
        return {"benchmarks": {}}

    monkeypatch.setattr(eval_cli, "evaluate", evaluate)
    bench = f"{BUCKET}/bench.json"
    fake_gcs.local(bench).parent.mkdir(parents=True)
    fake_gcs.local(bench).write_text("[]")
    fake_gcs.readonly.append(f"{BUCKET}/ro/")
    argv = ["eval", "--model", "none", "--prompt-format", "chat", "--benchmark", f"alignx={bench}", "--out"]
    assert main([*argv, f"{BUCKET}/ro/r.json"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert runs == [] and len(err) == 1, err
    assert err[0].startswith(f"alignx: error: --out {BUCKET}/ro/r.json: cannot be written (Forbidden: "), err
    fake_gcs.written.clear()
    assert main([*argv, f"{BUCKET}/rw/r.json"]) == 0
    assert len(runs) == 1
    assert json.loads(fake_gcs.local(f"{BUCKET}/rw/r.json").read_text()) == {"benchmarks": {}}
    assert [p.name for p in fake_gcs.local(f"{BUCKET}/rw").iterdir()] == ["r.json"]
    assert not [u for u in fake_gcs.written if u.endswith(".tmp")], fake_gcs.written


def test_a_bucket_clients_own_error_at_the_outs_first_look_is_one_line(fake_gcs, monkeypatch, capsys):
    """The folder check of a URL --out is the first call to the bucket: a storage client's own error there
    (missing credentials: not an OSError) is check_output's one line, as at the probe that follows; it
    escaped as a traceback, and on process 0 alone of a job (the others waiting in `agree`)."""
    from alignx_jax import distributed
    from alignx_jax.cli import main
    from alignx_jax.errors import AlignXError
    from alignx_jax.evaluate import cli as eval_cli

    class DefaultCredentialsError(Exception):  # google.auth's, as gcsfs raises it
        pass

    def no_credentials(self):
        raise DefaultCredentialsError("Your default credentials were not found.")

    monkeypatch.setattr(type(paths.path(BUCKET)), "is_dir", no_credentials)
    with pytest.raises(AlignXError, match=r"^--out gs://.*/r\.json: cannot be written \(Default"):
        distributed.check_output(f"{BUCKET}/r.json", "--out")
    monkeypatch.setattr(eval_cli, "evaluate", lambda *a, **kw: pytest.fail("evaluated"))
    bench = f"{BUCKET}/bench.json"
    fake_gcs.local(bench).parent.mkdir(parents=True)
    fake_gcs.local(bench).write_text("[]")
    argv = ["eval", "--model", "none", "--prompt-format", "chat", "--benchmark", f"alignx={bench}"]
    assert main([*argv, "--out", f"{BUCKET}/r.json"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"alignx: error: --out {BUCKET}/r.json: cannot be"), err


def test_export_reads_a_bucket_workdir_and_refuses_a_bucket_out(fake_gcs):
    from alignx_jax import export
    from alignx_jax.errors import CheckpointError
    from alignx_jax.models import checkpoint

    w = f"{BUCKET}/run"
    local = fake_gcs.local(w)
    (local / "checkpoints" / "3" / "params").mkdir(parents=True)
    (local / "checkpoints" / "5" / "params").mkdir(parents=True)
    (local / "reference").mkdir()
    (local / "reference" / "config.json").write_text("{}")
    (local / "reference" / "tokenizer.json").write_text("{}")
    res = checkpoint.resolve_checkpoint(w)
    assert res.step == 5
    assert res.params_dir == f"{w}/checkpoints/5/params"
    assert res.config_dir == f"{w}/reference" and res.tokenizer_dir == f"{w}/reference"
    assert res.head_dir is None
    assert checkpoint.resolve_checkpoint(w, 3).params_dir == f"{w}/checkpoints/3/params"
    (local.parent / "foreign").mkdir()
    (local.parent / "foreign" / "notes.txt").write_text("mine")
    args = types.SimpleNamespace(out=f"{BUCKET}/foreign", checkpoint=w, step=None, overwrite=False)
    with pytest.raises(CheckpointError, match="not empty and not an alignx export"):
        export.cli_export(args)
    assert (local.parent / "foreign" / "notes.txt").read_text() == "mine"


def test_a_bucket_runs_preference_head_is_read_from_the_bucket(fake_gcs, monkeypatch):
    """`alignx export --checkpoint gs://.../run` of a PBA run reads its head's meta and orbax item at the URL
    (os.path.abspath made it a local `CWD/gs:/...` path, as the params are not)."""
    from alignx_jax import checkpointing
    from alignx_jax.models import checkpoint

    w = f"{BUCKET}/run"
    local = fake_gcs.local(w)
    for item in ("params", "head"):
        (local / "checkpoints" / "4" / item).mkdir(parents=True)
    (local / "reference").mkdir()
    (local / "reference" / "config.json").write_text("{}")
    res = checkpoint.resolve_checkpoint(w)
    assert res.head_dir == f"{w}/checkpoints/4/head"
    asked = []

    class Stop(Exception):
        pass

    def read_meta(ckpts, step):
        asked.append((ckpts, step))
        raise Stop

    monkeypatch.setattr(checkpointing, "read_meta", read_meta)
    with pytest.raises(Stop):
        checkpoint.load_checkpoint_head(res)
    assert asked == [(f"{w}/checkpoints", 4)]


@pytest.fixture(scope="module")
def local_export(tmp_path_factory, tiny_hf_checkpoints):
    """(an imported checkpoint, its export to a local folder), made before any bucket is mocked."""
    from alignx_jax.cli import main

    root = tmp_path_factory.mktemp("export")
    assert main(["import", "--hf", tiny_hf_checkpoints["qwen2"], "--out", str(root / "ckpt")]) == 0
    assert main(["export", "--checkpoint", str(root / "ckpt"), "--out", str(root / "local")]) == 0
    from alignx_jax.models import checkpoint

    return root / "ckpt", root / "local", checkpoint.load_checkpoint(str(root / "ckpt"))


def test_export_to_a_bucket_uploads_the_same_files_as_a_local_export(local_export, fake_gcs, monkeypatch):
    from alignx_jax import export
    from alignx_jax.cli import main

    ckpt, local, model = local_export
    # the mocked bucket reroutes every epath, orbax's local reads too: the checkpoint is read beforehand
    monkeypatch.setattr(export, "load_checkpoint", lambda *a, **k: model)
    assert main(["export", "--checkpoint", str(ckpt), "--out", f"{BUCKET}/hf"]) == 0
    up = fake_gcs.local(f"{BUCKET}/hf")
    names = sorted(p.name for p in local.iterdir())
    assert sorted(p.name for p in up.iterdir()) == names and "alignx_export.json" in names
    for name in names:
        if name.endswith((".safetensors", ".json")) and name not in ("alignx_export.json", "README.md"):
            assert (up / name).read_bytes() == (local / name).read_bytes(), name


def test_export_to_a_bucket_checks_the_target_as_a_local_export(
    local_export, fake_gcs, monkeypatch, tmp_path, capsys
):
    """The bucket target gets a local target's checks: other weights are refused even with --overwrite,
    an export of another checkpoint needs --overwrite; a re-export removes the earlier export's shards;
    a killed upload has no manifest (the old one goes first) and its rerun needs no --overwrite."""
    import shutil

    from alignx_jax import export
    from alignx_jax.cli import main
    from alignx_jax.models.hf import EXPORT_MANIFEST, EXPORT_UPLOAD

    ckpt, local, model = local_export
    monkeypatch.setattr(export, "load_checkpoint", lambda *a, **k: model)
    other = tmp_path / "other-ckpt"
    shutil.copytree(ckpt, other)  # another checkpoint (source) with the same weights

    foreign = fake_gcs.local(f"{BUCKET}/foreign")
    foreign.mkdir(parents=True)
    (foreign / "model.safetensors").write_bytes(b"another model")
    assert main(["export", "--checkpoint", str(ckpt), "--out", f"{BUCKET}/foreign", "--overwrite"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.safetensors, weights no export wrote" in err[0], err
    assert sorted(p.name for p in foreign.iterdir()) == ["model.safetensors"]

    url, up = f"{BUCKET}/hf", fake_gcs.local(f"{BUCKET}/hf")
    assert main(["export", "--checkpoint", str(ckpt), "--out", url, "--shard-size", "20KB"]) == 0
    shards = sorted(p.name for p in up.glob("model-*.safetensors"))
    assert len(shards) > 1
    assert main(["export", "--checkpoint", str(other), "--out", url]) == 1
    assert "holds an export of" in capsys.readouterr().err
    assert json.loads((up / EXPORT_MANIFEST).read_text())["source"] == os.path.realpath(ckpt)
    assert main(["export", "--checkpoint", str(other), "--out", url, "--overwrite"]) == 0
    assert json.loads((up / EXPORT_MANIFEST).read_text())["source"] == os.path.realpath(other)
    assert sorted(p.name for p in up.iterdir()) == sorted(p.name for p in local.iterdir())  # no old shards

    real_open = open

    def killed(name, *a, **k):  # the upload dies at config.json: the folder must not look complete
        if os.fspath(name).endswith("config.json") and "alignx-export-" in os.fspath(name):
            raise OSError(5, "Input/output error")
        return real_open(name, *a, **k)

    monkeypatch.setattr(export, "open", killed, raising=False)
    assert main(["export", "--checkpoint", str(ckpt), "--out", url, "--overwrite"]) == 1
    assert "upload failed" in capsys.readouterr().err
    assert not (up / EXPORT_MANIFEST).exists() and (up / EXPORT_UPLOAD).is_file()
    monkeypatch.setattr(export, "open", real_open, raising=False)
    assert main(["export", "--checkpoint", str(ckpt), "--out", url]) == 0  # its rerun: no --overwrite
    assert json.loads((up / EXPORT_MANIFEST).read_text())["source"] == os.path.realpath(ckpt)
    assert sorted(p.name for p in up.iterdir()) == sorted(p.name for p in local.iterdir())


def _train_on_a_bucket(monkeypatch, w, *extra, config="tiny_cpu.py"):
    """`alignx train` of a few tiny steps with workdir `w` (a URL) and a stand-in checkpointer (orbax writes
    gs:// through tensorstore): (the checkpointer's directories, the steps it saved, the bucket's
    metrics.jsonl steps at each save)."""
    import alignx_jax.train.checkpoints as train_checkpoints
    from alignx_jax.metrics import read_metrics
    from alignx_jax.train.cli import cli_train

    ckpt_dirs, saved, logged = [], [], []

    class FakeCheckpointer:  # orbax writes gs:// through tensorstore: here only the path and steps count
        def __init__(self, directory, **kw):
            ckpt_dirs.append(directory)
            self.directory = directory

        def restore_newest_good(self, *a, **kw):
            return None

        def save(self, step, *a, **kw):
            saved.append(step)
            logged.append([r["step"] for r in read_metrics(w)])  # what a kill now would leave
            paths.path(f"{self.directory}/{step}").mkdir(parents=True, exist_ok=True)

        def wait(self):
            pass

        def check_background(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(train_checkpoints, "TrainCheckpointer", FakeCheckpointer)
    overrides = [
        "--config.model.init.hidden_size=32",
        "--config.model.init.intermediate_size=64",
        "--config.model.init.head_dim=8",
        "--config.data.synth_users=4",
        "--config.data.max_length=128",
        "--config.data.buckets=(128,)",
        "--config.loss.logps_chunk=64",
        "--config.train.global_batch=4",
        "--config.train.micro_batch=4",
        "--config.train.steps=2",
        "--config.checkpoint.every_steps=2",
        "--config.train.progress=false",
        f"--config.workdir={w}",
        *extra,
    ]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = types.SimpleNamespace(config_path=os.path.join(root, "configs", config), overrides=overrides)
    assert cli_train(args) == 0
    return ckpt_dirs, saved, logged


def test_tiny_training_run_on_a_bucket_workdir(fake_gcs, monkeypatch):
    """`alignx train` with workdir gs://.../run: config, metrics, reference and checkpoints land in the
    bucket; nothing in a local `gs:` folder (the fixture checks)."""
    w = f"{BUCKET}/run"
    ckpt_dirs, saved, logged = _train_on_a_bucket(monkeypatch, w, "--config.train.steps=3")
    assert ckpt_dirs == [f"{w}/checkpoints"] and saved == [2, 3]
    # metrics.jsonl is rewritten every 30 s, and at each save: a kill after a checkpoint loses no step of it
    assert logged == [[1, 2], [1, 2, 3]]
    local = fake_gcs.local(w)
    assert json.loads((local / "config.json").read_text())["workdir"] == w
    assert [json.loads(x)["step"] for x in (local / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (local / "reference" / "config.json").is_file()
    assert list((local / "reference").glob("*.safetensors"))
    assert (local / "data" / "data.parquet").is_file()
    assert (local / "checkpoints" / "2").is_dir()


@pytest.mark.parametrize(
    "config, extra, stored",
    [
        ("tiny_cpu.py", ["--config.loss.reference=precomputed"], "ref_logps.p0.npy"),
        (
            "tiny_pba.py",
            [
                "--config.pba.preference=predicted",
                "--config.pba.max_persona_tokens=128",
                "--config.pba.head_steps=5",
            ],
            "pba_predicted.npy",
        ),
    ],
    ids=["precomputed-reference", "pba-predicted"],
)
def test_derived_arrays_on_a_bucket_workdir(fake_gcs, monkeypatch, capsys, config, extra, stored):
    """loss.reference=precomputed (ref_logps.p0.npy) and pba.preference=predicted (pba_predicted.npy) on
    a gs:// workdir: the array is uploaded (np.save/os.replace on the URL was 'No such file'), with its
    fingerprint, and a second run reads it back from the bucket instead of computing it again."""
    import numpy as np

    w = f"{BUCKET}/derived"
    _train_on_a_bucket(monkeypatch, w, *extra, config=config)
    local = fake_gcs.local(w)
    first = np.load(local / stored)
    assert (local / f"{stored}.fingerprint").is_file()
    assert not [p.name for p in local.iterdir() if ".tmp" in p.name]
    capsys.readouterr()
    (local / "config.json").unlink()  # a fresh run in the same workdir: reuses the derived array
    (local / "train.lock").write_text("")
    _train_on_a_bucket(monkeypatch, w, *extra, config=config)
    err = capsys.readouterr().err
    assert "reference log-probs of" not in err and "first-stage preference head" not in err, err
    np.testing.assert_array_equal(np.load(local / stored), first)


def _rows(n: int) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(0)

    def d():
        return rng.choice([0.0, 0.5, 1.0], size=90).tolist()

    return [
        {
            "prompt": f"post {i}",
            "chosen": f"good answer {i}",
            "rejected": f"bad answer {i}",
            "Preference Direction": d(),
            "Demographic Information": f"I am {20 + i} years old.",
            "User-Generated Content": [{"prompt": f"ugc {i}", "comment": "c", "Preference Direction": d()}],
            "Pair-wise Comparative Feedback": [
                {"prompt": f"pair {i}", "chosen": "c", "rejected": "r", "Preference Direction": d()}
            ],
        }
        for i in range(n)
    ]


def test_row_files_and_folders_on_a_bucket(fake_gcs, tmp_path, capsys):
    """JSON, JSONL and parquet row files, and a folder of them, read from gs:// give the local rows;
    `alignx data check gs://...` and `alignx data split gs://... --out gs://...` work on them."""
    import pandas as pd

    from alignx_jax.cli import main
    from alignx_jax.data import schema, sources
    from alignx_jax.errors import DataError

    rows = _rows(6)
    local = tmp_path / "local"
    local.mkdir()
    (local / "a.json").write_text(json.dumps(rows[:2]))
    (local / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[2:4]))
    (local / "sub").mkdir()
    pd.DataFrame(rows[4:]).to_parquet(local / "sub" / "c.parquet")
    (local / "notes.txt").write_text("ignored")
    url = f"{BUCKET}/data"
    import shutil

    shutil.copytree(local, fake_gcs.local(url))
    for name in ("a.json", "b.jsonl", "sub/c.parquet"):
        got, _ = schema.load_rows(f"{url}/{name}")
        assert got == schema.load_rows(str(local / name))[0]
    got, _ = schema.load_rows(url)
    assert got == schema.load_rows(str(local))[0] and len(got) == 6
    assert schema.list_files(url) == [f"{url}/a.json", f"{url}/b.jsonl", f"{url}/sub/c.parquet"]
    assert len(sources.open_source(url)) == 6

    assert main(["data", "check", f"{url}/sub/c.parquet"]) == 0
    assert main(["data", "check", url]) == 0
    assert "rows: 6  files: 3" in capsys.readouterr().out
    assert main(["data", "split", url, "--out", f"{BUCKET}/split", "--test-fraction", "0.5"]) == 0
    capsys.readouterr()
    halves = [schema.load_rows(f"{BUCKET}/split/{h}")[0] for h in ("train", "test")]
    assert sorted(r["prompt"] for h in halves for r in h) == sorted(r["prompt"] for r in rows)
    assert (fake_gcs.local(f"{BUCKET}/split") / "train" / "sub").is_dir() or (
        fake_gcs.local(f"{BUCKET}/split") / "test" / "sub"
    ).is_dir()

    with pytest.raises(DataError, match=f"^{BUCKET}/nope.json: no such file or folder$"):
        schema.load_rows(f"{BUCKET}/nope.json")
    assert main(["data", "check", f"{BUCKET}/nope"]) == 1
    err = capsys.readouterr().err
    assert f"{BUCKET}/nope" in err and len(err.strip().splitlines()) == 1


def test_data_split_refuses_a_bucket_out_holding_its_input(fake_gcs, capsys):
    """`data split gs://B/a --out gs://B/a` put train/ and test/ beside the input file, a folder train and
    eval then refused (only a local --out was checked); an --out whose half would replace the input is
    refused as locally. One line each, nothing written."""
    from alignx_jax.cli import main

    data = fake_gcs.local(BUCKET)
    for name in ("a/rows.jsonl", "b/train/t.jsonl"):
        (data / name).parent.mkdir(parents=True)
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in _rows(4)))
    for src, out, words in (
        (f"{BUCKET}/a", f"{BUCKET}/a/", f"--out {BUCKET}/a/ holds the input file {BUCKET}/a/rows.jsonl"),
        (f"{BUCKET}/b/train/t.jsonl", f"{BUCKET}/b", "--out would overwrite this input file"),
    ):
        before = sorted(str(p.relative_to(data)) for p in data.rglob("*"))
        assert main(["data", "split", src, "--by", "row", "--out", out]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
        assert sorted(str(p.relative_to(data)) for p in data.rglob("*")) == before


def test_an_out_on_a_bucket_never_replaces_an_input_there(fake_gcs, tmp_path, capsys):
    """contrast, predict-preferences and eval --out naming one of their input files on a bucket are refused
    in one line before any model is read, as a local one is (and as data split refuses it: the path itself
    is compared): contrast and predict-preferences did so before paths.refuse_to_replace, which left every
    URL --out unchecked (contrast overwrote its input with exit 0)."""
    from alignx_jax.cli import main

    psoups = [
        {
            "prompt": f"p{i}",
            "chosen": f"c{i}",
            "rejected": f"r{i}",
            "ground_truth_persona": f"persona {i % 2}",
        }
        for i in range(4)
    ]
    files = {"ps.json": json.dumps(psoups), "rows.jsonl": "".join(json.dumps(r) + "\n" for r in _rows(2))}
    for name, text in files.items():
        (fake_gcs.local(BUCKET) / name).parent.mkdir(parents=True, exist_ok=True)
        (fake_gcs.local(BUCKET) / name).write_text(text)
    no_model = str(tmp_path / "no_model")
    for argv, words in (
        (["data", "contrast", f"{BUCKET}/ps.json", "--out", f"{BUCKET}/ps.json"], "is the input file"),
        (
            ["predict-preferences", "--model", no_model, "--data", f"{BUCKET}/rows.jsonl"]
            + ["--out", f"{BUCKET}/rows.jsonl"],
            "is the --data file",
        ),
        (
            ["eval", "--model", no_model, "--benchmark", f"p-soups={BUCKET}/ps.json", "--method", "none"]
            + ["--out", f"{BUCKET}/ps.json"],
            "is the --benchmark p-soups file",
        ),
        (  # a folder: its files by name, not listed (a new file there would be read with them next time)
            ["eval", "--model", no_model, "--benchmark", f"p-soups={BUCKET}/", "--method", "none"]
            + ["--out", f"{BUCKET}/ps.json"],
            f"lies inside the --benchmark p-soups folder {BUCKET}/",
        ),
        (
            ["predict-preferences", "--model", no_model, "--data", BUCKET]
            + ["--out", f"{BUCKET}/new/predictions.jsonl"],
            f"lies inside the --data folder {BUCKET}",
        ),
    ):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    for name, text in files.items():
        assert (fake_gcs.local(BUCKET) / name).read_text() == text


def test_prepare_from_a_bucket_reads_each_file_once(fake_gcs, tmp_path, monkeypatch):
    """`data prepare gs://...` finds the kind from each file's first rows reading only as far as they go (it
    read every file at a URL whole for them, then again for its rows), and writes every row."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from conftest import count_reads

    from alignx_jax.data import sources

    rng = np.random.default_rng(1)
    rows = [dict(r, chosen=rng.bytes(2000).hex()) for r in _rows(900)]  # 4 kB a row that compresses little
    url = f"{BUCKET}/rows"
    local = fake_gcs.local(url)
    local.mkdir(parents=True)
    (local / "a.json").write_text(json.dumps(rows, indent=1))
    (local / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # pages of a few rows: as a default file's 1 MiB pages are a small part of a large file
    pq.write_table(
        pa.Table.from_pylist(rows), local / "c.parquet", data_page_size=1 << 14, write_batch_size=8
    )
    read = count_reads(monkeypatch, fake_gcs.root)
    result = sources.prepare(url, str(tmp_path / "out"))
    monkeypatch.undo()
    assert result["splits"] == {"train": {"rows": 2700, "skipped": 0}}
    for name in ("a.json", "b.jsonl", "c.parquet"):  # once whole, plus a head of 100 rows of 900 (was twice)
        size = (local / name).stat().st_size
        assert size <= read[str(local / name)] < 1.5 * size, (name, size, read)


def test_hf_model_folder_on_a_bucket_is_copied_once(fake_gcs, tmp_path, monkeypatch, tiny_hf_checkpoints):
    """model.hf_path=gs://... resolves to a local copy (same logits as the local folder); a second
    resolve re-uses it without reading the bucket again; a URL without config.json is one line."""
    import shutil

    import jax.numpy as jnp
    import numpy as np

    from alignx_jax.errors import CheckpointError
    from alignx_jax.models import presets
    from alignx_jax.models.hf import load_pretrained

    monkeypatch.setenv("ALIGNX_CACHE_DIR", str(tmp_path / "cache"))
    src = tiny_hf_checkpoints["llama"]
    url = f"{BUCKET}/models/llama"
    shutil.copytree(src, fake_gcs.local(url))
    got = presets.resolve_model_path(url)
    assert got.startswith(str(tmp_path / "cache" / "remote")) and os.path.isdir(got)
    assert sorted(os.listdir(src)) == sorted(n for n in os.listdir(got) if n != presets.REMOTE_MARKER)
    ids = jnp.asarray([[5, 17, 99, 3, 42]])
    np.testing.assert_array_equal(
        np.asarray(load_pretrained(got)(ids)), np.asarray(load_pretrained(src)(ids))
    )

    def no_copy(*a):
        raise AssertionError("copied again")

    with monkeypatch.context() as m:
        m.setattr(presets, "_copy_entries", no_copy)
        assert presets.resolve_model_path(url + "/") == got  # the complete copy is re-used
    assert [p.name for p in (tmp_path / "cache" / "remote").iterdir()] == [os.path.basename(got)]

    with pytest.raises(CheckpointError, match=f"^{BUCKET}/models/none: no config.json") as e:
        presets.resolve_model_path(f"{BUCKET}/models/none")
    assert "\n" not in str(e.value)


def test_a_rewritten_bucket_model_folder_is_copied_again(
    fake_gcs, tmp_path, monkeypatch, tiny_hf_checkpoints
):
    """The cached copy of a gs:// model folder is re-used while the folder's listing (size, mtime) is the
    one copied: a re-export to the same URL is copied again; an unfinished export upload is refused."""
    import shutil

    from alignx_jax.errors import CheckpointError
    from alignx_jax.models import presets
    from alignx_jax.models.hf import EXPORT_MANIFEST, EXPORT_UPLOAD

    monkeypatch.setenv("ALIGNX_CACHE_DIR", str(tmp_path / "cache"))
    url = f"{BUCKET}/models/llama"
    up = fake_gcs.local(url)
    shutil.copytree(tiny_hf_checkpoints["llama"], up)
    (up / EXPORT_MANIFEST).write_text(json.dumps({"files": ["config.json"], "source": "/runs/a"}))
    got = presets.resolve_model_path(url)
    assert json.loads(open(os.path.join(got, EXPORT_MANIFEST)).read())["source"] == "/runs/a"

    (up / EXPORT_MANIFEST).write_text(json.dumps({"files": ["config.json"], "source": "/runs/b"}))
    later = os.stat(up / EXPORT_MANIFEST).st_mtime + 5  # the same size; uploaded later (epath: whole seconds)
    os.utime(up / EXPORT_MANIFEST, (later, later))
    assert presets.resolve_model_path(url) == got  # a re-export to the same URL: copied again
    assert json.loads(open(os.path.join(got, EXPORT_MANIFEST)).read())["source"] == "/runs/b"
    assert [p.name for p in (tmp_path / "cache" / "remote").iterdir()] == [os.path.basename(got)]

    (up / EXPORT_UPLOAD).write_text("{}")  # a re-upload under way (or killed): its manifest deleted first
    (up / EXPORT_MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=f"^{url}: an unfinished `alignx export` upload") as e:
        presets.resolve_model_path(url)
    assert "\n" not in str(e.value)


def test_a_bucket_training_workdir_copies_only_its_latest_step(fake_gcs, tmp_path, monkeypatch):
    """`--model gs://.../W` (a training workdir): the local copy holds W/config.json, W/reference and the
    latest step without its optimizer state; not the other steps, data, metrics or tensorboard."""
    from alignx_jax.models import checkpoint, presets

    monkeypatch.setenv("ALIGNX_CACHE_DIR", str(tmp_path / "cache"))
    url = f"{BUCKET}/runs/w"
    w = fake_gcs.local(url)
    files = {
        "config.json": '{"data": {"prompt_format": "chat"}}',
        "metrics.jsonl": "{}",
        "data/data.parquet": "rows",
        "tensorboard/events": "ev",
        "reference/config.json": "{}",
        "reference/tokenizer.json": "{}",
        "reference/model.safetensors": "base",
        "checkpoints/3/params/d/a": "p3",
        "checkpoints/3/opt_state/d/a": "o3",
        "checkpoints/5/params/d/a": "p5",
        "checkpoints/5/params/_METADATA": "m5",
        "checkpoints/5/opt_state/d/a": "o5",
        "checkpoints/5/meta/metadata": "{}",
        "checkpoints/5/head/d/a": "h5",
        "checkpoints/6.orbax-checkpoint-tmp-1/params/d/a": "unfinished",
    }
    for name, text in files.items():
        (w / name).parent.mkdir(parents=True, exist_ok=True)
        (w / name).write_text(text)
    got = presets.resolve_model_path(url)
    copied = sorted(
        os.path.relpath(os.path.join(d, n), got)
        for d, _, ns in os.walk(got)
        for n in ns
        if n != presets.REMOTE_MARKER
    )
    assert copied == sorted(
        n
        for n in files
        if n.startswith(("config.json", "reference/", "checkpoints/5/")) and "opt_state" not in n
    )
    res = checkpoint.resolve_checkpoint(got)
    assert res.step == 5 and res.params_dir == os.path.join(got, "checkpoints", "5", "params")
    (w / "checkpoints/7/params").mkdir(parents=True)  # a newer step: copied in place of step 5
    (w / "checkpoints/7/params/a").write_text("p7")
    assert presets.resolve_model_path(url) == got and checkpoint.resolve_checkpoint(got).step == 7
    assert not os.path.exists(os.path.join(got, "checkpoints", "5"))
    # step 5's params were adapters alone (no embed_tokens in its tree): the base weights came along; a step
    # holding the whole model does not need them (an 8B base is 16 GB)
    assert os.path.isfile(os.path.join(got, "reference", "model.safetensors"))
    (w / "checkpoints/8/params").mkdir(parents=True)
    (w / "checkpoints/8/params/_METADATA").write_text('{"tree": {"embed_tokens": {}}}')
    assert presets.resolve_model_path(url) == got and checkpoint.resolve_checkpoint(got).step == 8
    assert sorted(os.listdir(os.path.join(got, "reference"))) == ["config.json", "tokenizer.json"]


def test_path_signature_of_a_bucket_folder(fake_gcs):
    """A gs:// data folder's signature (size, mtime per file) changes when a file is rewritten."""
    from alignx_jax import workdir as wd

    url = f"{BUCKET}/data"
    (fake_gcs.local(url) / "sub").mkdir(parents=True)
    (fake_gcs.local(url) / "a.json").write_text("[]")
    (fake_gcs.local(url) / "sub" / "b.jsonl").write_text("")
    sig = wd.path_signature(url)
    assert [x[:2] for x in sig] == [["a.json", 2], ["sub/b.jsonl", 0]]
    assert wd.path_signature(f"{url}/a.json")[0][:2] == ["a.json", 2]
    (fake_gcs.local(url) / "a.json").write_text("[ ]")
    assert wd.path_signature(url) != sig
    assert wd.path_signature(f"{BUCKET}/none") == []


def test_a_missing_bucket_client_or_an_unknown_scheme_is_one_line(monkeypatch, capsys):
    """gs:// without gcsfs (what epath raises: an ImportError asking to install it) and a scheme epath does
    not open (file://, its own error a KeyError traceback): one `alignx: error:` line each, exit 1."""
    from alignx_jax.cli import main

    def no_client(_):
        raise ImportError("Please install gcsfs to access Google Storage")

    assert main(["data", "check", "file:///tmp/rows.json"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "file:///tmp/rows.json" in err[0], err
    assert "not a local path nor a gs:///s3:///az:///abfs:// URL" in err[0]
    monkeypatch.setattr(paths.epath, "Path", no_client)
    assert main(["data", "check", "gs://bucket/rows.json"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Please install gcsfs" in err[0] and "pip install -e '.[gcs]'" in err[0], err


def test_a_killed_runs_local_synthetic_users_are_removed_by_the_next_bucket_run(
    fake_gcs, tmp_path, monkeypatch
):
    """A gs:// workdir's synthetic users are written aside in the system's temporary folder
    (`.alignx-synth-KEY.tmp-HOST-PID`) and renamed: a kill left that folder there for good. The next run
    removes those of pids gone from this host, and nothing of a live pid, another host or another program."""
    import subprocess
    import tempfile

    from alignx_jax.config import load_config
    from alignx_jax.train.setup import ensure_data

    systmp = tmp_path / "systmp"
    systmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid no process holds now
    host = socket.gethostname()
    dead = [
        systmp / f".alignx-synth-0123456789abcdef.tmp-{host}-{gone.pid}",
        systmp / f".alignx-synth-0123456789abcdef.fingerprint.tmp-{host}-{gone.pid}",
    ]
    dead[0].mkdir()
    (dead[0] / "data.parquet").write_bytes(b"half")
    dead[1].write_text("half")
    kept = [
        systmp / f".alignx-synth-0123456789abcdef.tmp-{host}-{os.getppid()}",  # a live run's, being written
        systmp / f".alignx-synth-0123456789abcdef.tmp-{host}x-{gone.pid}",  # another host's (a shared /tmp)
        systmp / f".other.tmp-{host}-{gone.pid}",  # another program's
        systmp / f".alignx-synth-notakey.tmp-{host}-{gone.pid}",
    ]
    for p in kept:
        p.mkdir()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(
        os.path.join(root, "configs", "tiny_cpu.py"),
        ["--config.data.synth_users=4", f"--config.workdir={BUCKET}/run"],
    )
    local = ensure_data(cfg, cfg.workdir, True)
    assert os.path.dirname(local) == str(systmp) and os.path.isfile(os.path.join(local, "data.parquet"))
    assert not any(p.exists() for p in dead)
    assert all(p.is_dir() for p in kept)
    assert (fake_gcs.local(f"{BUCKET}/run") / "data" / "data.parquet").is_file()


def test_within_compares_places_by_name(tmp_path):
    """`paths.within`: a folder itself or a path under it, local by real path (a link leads where it
    points), a URL as written less a trailing '/'; a URL and a local path never meet."""
    from alignx_jax import paths

    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "src")
    assert paths.within(str(tmp_path / "src"), str(tmp_path / "src"))
    assert paths.within(str(tmp_path / "link" / "sub" / "out"), str(tmp_path / "src"))
    assert not paths.within(str(tmp_path / "srcx"), str(tmp_path / "src"))
    assert not paths.within(str(tmp_path), str(tmp_path / "src"))
    assert paths.within("gs://b/data/", "gs://b/data") and paths.within("gs://b/data/x", "gs://b/data/")
    assert not paths.within("gs://b/datax", "gs://b/data")
    assert not paths.within("gs://b/data", str(tmp_path))
    # an output named with a trailing '/' is still the input folder itself
    assert paths.refuse_inside_inputs("--out", "gs://b/in/", [("--data", "gs://b/in")]) is not None


def test_same_place_is_one_input_however_it_is_spelled(tmp_path, monkeypatch):
    """`paths.same_place`, what the resume checks compare recorded inputs with: a relative, linked or
    trailing-'/' spelling of a place is that place; another file, or a URL against a local path, is not."""
    from alignx_jax import paths

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "d.json").write_text("[]")
    (tmp_path / "src" / "e.json").write_text("[]")
    (tmp_path / "link").symlink_to(tmp_path / "src")
    monkeypatch.chdir(tmp_path)
    real = str(tmp_path / "src" / "d.json")
    for spelling in ("src/d.json", "./src//d.json", str(tmp_path / "link" / "d.json"), "link/../src/d.json"):
        assert paths.same_place(spelling, real), spelling
    assert paths.same_place(str(tmp_path / "src") + "/", "link")
    assert not paths.same_place("src/e.json", real) and not paths.same_place("src/d.jsonx", real)
    assert paths.same_place("gs://b/w/", "gs://b/w") and not paths.same_place("gs://b/w", "gs://b/wx")
    assert not paths.same_place("gs://b/w", "gs:/b/w")  # a local folder named so, not the bucket
    assert paths.same_place({"scores": "src/d.json"}, {"scores": real})
    assert not paths.same_place({"scores": real}, {"scores": real, "x": 1}) and not paths.same_place(
        None, real
    )
    assert paths.same_place(None, None) and not paths.same_place("", ".")


def test_an_export_of_a_bucket_checkpoint_is_its_own_however_the_url_ends():
    """The export manifest names its checkpoint by place: `--checkpoint gs://b/w/` and `gs://b/w` are one
    source (an export into a folder of the other was 'holds an export of'); another checkpoint is not."""
    from alignx_jax import export
    from alignx_jax.errors import CheckpointError

    assert export._export_source(f"{BUCKET}/w/") == export._export_source(f"{BUCKET}/w") == f"{BUCKET}/w"
    manifest = {"source": f"{BUCKET}/w/", "files": ["config.json"]}  # as an earlier version recorded it
    assert export._check_target("hf", ["config.json"], manifest, f"{BUCKET}/w", False) == {"config.json"}
    with pytest.raises(CheckpointError, match=f"holds an export of {BUCKET}/w/; pass --overwrite"):
        export._check_target("hf", ["config.json"], manifest, f"{BUCKET}/wx", False)
