"""TFDS array_record preparation (without TensorFlow), row sources and the resumable TrainLoader."""

from __future__ import annotations

import glob
import importlib.util
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from conftest import count_reads, run_cli

from alignx_jax.data import schema as schema_mod
from alignx_jax.data import synth
from alignx_jax.data.batching import DPOExample
from alignx_jax.data.persona import HISTORY_MODES, row_rng
from alignx_jax.data.sources import (
    HELD_OUT,
    ListSource,
    TrainLoader,
    find_prepared,
    open_source,
    prepare,
    shard_rows,
)
from alignx_jax.errors import ConfigError, DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "alignx_jax", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        timeout=180,
    )


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("syn"))
    synth.write_world(synth.generate_world(30, 3, seed=1), out)
    return out


def test_tensorflow_is_absent():
    assert importlib.util.find_spec("tensorflow") is None
    with pytest.raises(ImportError):
        import tensorflow  # noqa: F401


def test_prepare_roundtrip(synth_dir, tmp_path):
    out = str(tmp_path / "tfds")
    r = _cli("data", "prepare", "--source", synth_dir, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "train: 90 rows written, 0 skipped" in r.stdout
    files = glob.glob(os.path.join(out, "**", "*.array_record*"), recursive=True)
    assert files and "tensorflow" not in sys.modules
    prepared, raw = open_source(out), open_source(synth_dir)
    assert len(prepared) == len(raw) == 90
    for i in range(len(raw)):  # same rows, same order, nested history intact
        assert prepared[i] == raw[i]
    assert isinstance(prepared[0]["User-Generated Content"][0]["Preference Direction"], list)
    # TFDS's own readers see it too, with no TensorFlow.
    import tensorflow_datasets as tfds

    import alignx_jax.data.tfds_builder  # noqa: F401  (registers the `alignx` builder)

    ds = tfds.data_source("alignx", data_dir=out, split="train")
    assert len(ds) == 90 and json.loads(ds[7]["row"])["prompt"] == raw[7]["prompt"] and ds[7]["index"] == 7


def test_prepare_refuses_an_out_inside_the_source_folder(synth_dir, tmp_path):
    """`prepare --source DIR --out DIR/prepared` wrote TFDS's dataset_info.json and features.json into DIR,
    whose next read (data check, train, this prepare again) took them for rows: `expected a JSON list of
    rows, got dict`. It is refused before anything is written; an --out beside the source works."""
    src = tmp_path / "src"
    shutil.copytree(synth_dir, src)
    for out in (src / "prepared", src):
        with pytest.raises(DataError, match=r"src: --out .* is inside the source folder"):
            prepare(str(src), str(out))
    assert sorted(os.listdir(src)) == sorted(os.listdir(synth_dir))
    assert prepare(str(src / "data.parquet"), str(tmp_path / "beside"))["splits"]["train"]["rows"] == 90


def test_prepare_splits_and_skip_bad_rows(synth_dir, tmp_path):
    rows = [open_source(synth_dir)[i] for i in range(6)]
    src = tmp_path / "src"
    for split, part in (("train", rows[:4]), ("test", rows[4:])):
        (src / split).mkdir(parents=True)
        lines = [json.dumps(r) for r in part]
        if split == "train":
            lines.insert(1, json.dumps({"prompt": "x", "chosen": "y"}))  # missing `rejected`
        (src / split / "rows.jsonl").write_text("\n".join(lines) + "\n")
    r = _cli("data", "prepare", "--source", str(src), "--out", str(tmp_path / "bad"))
    assert r.returncode == 1 and "rows.jsonl" in r.stderr and "Traceback" not in r.stderr
    assert not glob.glob(str(tmp_path / "bad" / "**" / "*.array_record*"), recursive=True)
    result = prepare(str(src), str(tmp_path / "ok"), skip_bad=True)
    first = result["splits"]["train"].pop("first_skipped")  # the skipped row, named
    assert "rows.jsonl, row 1" in first and "rejected" in first, first
    assert result["splits"] == {"train": {"rows": 4, "skipped": 1}, "test": {"rows": 2, "skipped": 0}}
    test_rows = open_source(str(tmp_path / "ok"), split="test")
    assert [test_rows[i] for i in range(2)] == rows[4:]
    assert open_source(str(src), split="test").rows == rows[4:]  # raw folders pick the split too
    with pytest.raises(DataError):
        open_source(str(tmp_path / "ok"), split="validation")
    # data.eval's HELD_OUT: the test half of a split or prepared folder, never its training half
    for folder in (src, tmp_path / "ok"):
        held = open_source(str(folder), split=HELD_OUT, skip_bad=True)
        assert [held[i] for i in range(len(held))] == rows[4:]
    held = open_source(str(src / "test" / "rows.jsonl"), split=HELD_OUT)  # a file: its rows
    assert len(held) == 2 and held.where(1) == (str(src / "test" / "rows.jsonl"), 1)


def test_prepare_leaves_no_temporary_folder(synth_dir, tmp_path, monkeypatch):
    """TFDS's builder made an empty tmp*tfds folder per prepare (a look in its public bucket) and left it."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    assert prepare(synth_dir, str(tmp_path / "out"))["splits"]["train"]["rows"] == 90
    assert os.listdir(tmp) == []


def test_prepare_lists_the_source_once(synth_dir, tmp_path, monkeypatch):
    """A split folder is walked once per prepare (it was walked for the stray-file check, then each split
    twice more); a TFDS folder inside a split is still refused before anything is written."""
    rows = [open_source(synth_dir)[i] for i in range(4)]
    src = tmp_path / "src"
    for split, part in (("train", rows[:3]), ("test", rows[3:])):
        (src / split / "sub").mkdir(parents=True)
        (src / split / "sub" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    walked, real_walk = [], os.walk

    def counting(top, *a, **kw):
        if str(top).startswith(str(src)):
            walked.append(str(top))
        return real_walk(top, *a, **kw)

    monkeypatch.setattr(os, "walk", counting)
    result = prepare(str(src), str(tmp_path / "out"))
    assert result["splits"] == {"train": {"rows": 3, "skipped": 0}, "test": {"rows": 1, "skipped": 0}}
    assert walked == [str(src)]
    monkeypatch.undo()
    tfds_folder = src / "test" / "alignx" / "1.0.0"  # a TFDS dataset 3 levels below src, 2 below test/
    tfds_folder.mkdir(parents=True)
    for name in ("features.json", "dataset_info.json"):
        (tfds_folder / name).write_text("{}")
    with pytest.raises(DataError, match=r"test: a TFDS dataset folder"):
        prepare(str(src), str(tmp_path / "out2"))
    shutil.rmtree(src / "test" / "alignx")
    (src / "validation").mkdir()  # an empty split folder, refused as before
    with pytest.raises(DataError, match=r"validation: folder holds no .parquet, .jsonl or .json files"):
        prepare(str(src), str(tmp_path / "out2"))
    assert not (tmp_path / "out2").exists()


def test_prepare_reads_each_file_once(synth_dir, tmp_path, monkeypatch):
    """The kind is found from each file's first 100 rows before any row is written, reading a JSON file only
    as far as they go: it was read whole for them, then again for its rows (a file at a URL too:
    tests/test_remote_paths.py)."""
    rows = [open_source(synth_dir)[i] for i in range(90)] * 10
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.json").write_text(json.dumps(rows, indent=1))
    (src / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    read = count_reads(monkeypatch, src)
    result = prepare(str(src), str(tmp_path / "out"))
    monkeypatch.undo()
    assert result["splits"] == {"train": {"rows": 1800, "skipped": 0}}
    for name in ("a.json", "b.jsonl"):  # once whole, plus the head: a tenth of the rows, twice at most
        size = (src / name).stat().st_size
        assert size <= read[str(src / name)] < 1.3 * size, (name, size, read)


def test_a_killed_prepares_folder_goes_with_the_next_prepare(synth_dir, tmp_path):
    """A SIGKILLed prepare leaves OUT/alignx/incomplete.* and OUT/downloads/extracted: the next prepare into
    OUT removes them, holding OUT/alignx's flock (as every prepare does while it writes) and finding only
    TFDS's files there; a folder of that name holding another file is kept and named; while another prepare
    holds the flock, one is refused and touches nothing."""
    import fcntl
    import signal

    out = tmp_path / "out"
    kill_at_first_row = (
        "import os, signal, sys\n"
        "from alignx_jax.data import sources, tfds_builder\n"
        "tfds_builder.encode_row = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
        "sources.prepare(sys.argv[1], sys.argv[2])\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", kill_at_first_row, synth_dir, str(out)],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        timeout=180,
    )
    assert r.returncode == -signal.SIGKILL
    (left,) = glob.glob(str(out / "alignx" / "incomplete.*"))
    assert (out / "downloads" / "extracted").is_dir()
    # what a kill later on leaves there too: a shard and a TFDS temporary file
    with open(os.path.join(left, "alignx-train.array_record-00000-of-00001"), "wb") as f:
        f.write(b"\0" * 64)
    with open(os.path.join(left, f"incomplete.{'0' * 32}.features.json"), "w") as f:
        f.write("{")
    user = out / "alignx" / "incomplete.USER01_1.0.0"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    (out / "alignx" / "incomplete.notes").mkdir()
    fd = os.open(out / "alignx", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another prepare writing there
        with pytest.raises(DataError, match="another `alignx data prepare` is writing there"):
            prepare(synth_dir, str(out))
    finally:
        os.close(fd)
    assert len(os.listdir(left)) == 2 and (out / "downloads" / "extracted").is_dir()
    r = run_cli(["data", "prepare", "--source", synth_dir, "--out", out])
    assert r.returncode == 0, r.stderr
    assert f"removed {left}: the unfinished folder of a prepare that was killed" in r.stdout
    assert f"alignx: warning: {user}: " in r.stderr and f"rm -r {user}" in r.stderr
    assert sorted(os.listdir(out)) == ["alignx"]
    assert sorted(os.listdir(out / "alignx")) == ["1.0.0", "incomplete.USER01_1.0.0", "incomplete.notes"]
    assert (user / "notes.txt").read_text() == "mine" and len(open_source(str(out))) == 90


# ------------------------------------------------------------------ loader


def _fake_example(row, rng, index):
    """Token ids from the row index; rows whose index is 3 mod 7 are 'too long' and dropped."""
    if index % 7 == 3:
        return None
    draw = int(rng.integers(1, 1000))  # depends on the per-(seed, epoch, index) rng
    return DPOExample(
        prompt_ids=[5, index % 50 + 10], chosen_ids=[draw % 97 + 1, 2], rejected_ids=[7, 8, 2], index=index
    )


def _rows(n):
    return ListSource([{"i": i} for i in range(n)])


def _loader(n=101, **kw):
    args = dict(pairs_per_batch=4, pad_id=0, buckets=(8, 16), seed=3, shard_index=0, shard_count=1)
    args.update(kw)
    return TrainLoader(_rows(n), _fake_example, **args)


def _same(a, b):
    (ba, ia), (bb, ib) = a, b
    return ia == ib and ba.keys() == bb.keys() and all(np.array_equal(ba[k], bb[k]) for k in ba)


def test_resume_continues_with_next_batch():
    first = _loader()
    it = iter(first)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(first.get_state()))  # must survive JSON
    run_a = [next(it) for _ in range(3)]
    second = _loader()
    second.set_state(state)
    run_b = [next(iter(second)) for _ in range(3)]
    assert all(_same(a, b) for a, b in zip(run_a, run_b))
    fresh = [next(iter(_loader())) for _ in range(1)]
    assert not _same(fresh[0], run_a[0])  # it did not restart from the beginning
    assert run_a[0][1]["step"] == 6


def test_epochs_cover_rows_once_and_reshuffle():
    loader = _loader(n=40, num_epochs=2)
    assert loader.steps_per_epoch == 10 and len(loader) == 20
    seen = {0: [], 1: []}
    batches = list(loader)
    assert len(batches) == 20
    for batch, info in batches:
        assert batch["input_ids"].shape == (8, 8) and batch["pair_mask"].shape == (4,)
        seen[info["epoch"]] += [int(i) for i in batch["index"] if i >= 0]
    kept = [i for i in range(40) if i % 7 != 3]
    for e in (0, 1):
        assert sorted(seen[e]) == kept
    assert seen[0] != seen[1]  # a new order each epoch
    last = batches[-1][1]
    assert last["rows_seen"] == 80 and last["rows_dropped"] == 2 * (40 - len(kept))
    # dropped rows became dummy pairs: every batch still has 4 pair slots
    assert sum(int(b["pair_mask"].sum()) for b, _ in batches) == 2 * len(kept)


def test_rng_is_per_seed_epoch_index():
    draws = {}

    def spy(row, rng, index):
        draws[index] = int(rng.integers(1 << 30))
        return _fake_example(row, row_rng(3, (0, index)), index)

    loader = TrainLoader(
        _rows(20),
        spy,
        pairs_per_batch=5,
        pad_id=0,
        buckets=(8,),
        seed=3,
        shard_index=0,
        shard_count=1,
        num_epochs=1,
    )
    list(loader)
    assert draws == {i: int(row_rng(3, (0, i)).integers(1 << 30)) for i in range(20)}


def test_history_modes_sample_fixed_all():
    """data.history: 'sample' draws per (epoch, row), 'fixed' repeats epoch 0's draw, 'all' passes None."""
    for mode in HISTORY_MODES:
        draws = {}

        def spy(row, rng, index, draws=draws):
            draws.setdefault(index, []).append(None if rng is None else int(rng.integers(1 << 30)))
            return _fake_example(row, row_rng(3, (0, index)), index)

        loader = TrainLoader(
            _rows(12), spy, pairs_per_batch=4, pad_id=0, buckets=(8,), seed=3, shard_index=0,
            shard_count=1, num_epochs=2, history=mode,
        )  # fmt: skip
        list(loader)
        epoch = {e: {i: int(row_rng(3, (e, i)).integers(1 << 30)) for i in range(12)} for e in (0, 1)}
        want = {
            "sample": {i: [epoch[0][i], epoch[1][i]] for i in range(12)},
            "fixed": {i: [epoch[0][i]] * 2 for i in range(12)},
            "all": {i: [None, None] for i in range(12)},
        }[mode]
        assert draws == want, mode
        state = loader.get_state()
        assert state["history"] == mode
        other = "all" if mode != "all" else "sample"
        with pytest.raises(ConfigError, match="history"):
            _loader(n=12, history=other).set_state(state)
    with pytest.raises(ConfigError, match="data.history must be one of"):
        _loader(history="some")


def test_shards_are_disjoint_and_equal():
    parts = []
    for h in range(3):
        loader = _loader(n=50, shard_index=h, shard_count=3, num_epochs=1, pairs_per_batch=2)
        assert loader.steps_per_epoch == 8  # floor(50 / 3) = 16 rows, 2 per batch
        parts.append({int(x) for x in loader.shard_order(0)})
    assert all(len(p) == 16 for p in parts)
    assert not (parts[0] & parts[1]) and not (parts[1] & parts[2]) and not (parts[0] & parts[2])


def test_shard_rows_is_the_loaders_shard():
    """`shard_rows` is what `alignx train` asks to refuse, in config keys, data of no full batch before
    the loader is built: the loader's shards are that long, and it refuses exactly the shards shorter than
    a batch."""
    for n, hosts, twins, ppb in itertools.product((7, 8, 12, 50), (1, 2, 3), (False, True), (2, 4, 6)):
        if twins and n % 2:  # twins come in whole pairs (the loader's own error)
            continue
        for drop in (True, False):
            rows = shard_rows(n, hosts, twins=twins, drop_remainder=drop)
            kw = dict(n=n, shard_count=hosts, twins=twins, pairs_per_batch=ppb, drop_remainder=drop)
            if drop and rows < ppb:
                with pytest.raises((ConfigError, DataError), match="make no full batch|cannot feed"):
                    _loader(**kw)
                continue
            loaders = [_loader(shard_index=h, **kw) for h in range(hosts)]
            assert loaders[0].shard_size == rows
            lengths = [len(loader.shard_order(0)) for loader in loaders]
            assert (set(lengths) == {rows}) if drop else (max(lengths) == rows), (kw, lengths, rows)


def _global_steps(hosts, steps, states=None):
    """`steps` global batches of `hosts` loaders (their sorted row indices, each host's rows_seen), resumed
    from `states` (every host's saved state) when given; then the hosts' states."""
    if states is not None:
        for h in hosts:
            h.set_states(json.loads(json.dumps(states)))  # as a checkpoint's JSON holds them
    its = [iter(h) for h in hosts]
    out = []
    for _ in range(steps):
        parts = [next(it) for it in its]
        out.append(
            (sorted(i for b, _ in parts for i in b["idx"]), sum(info["rows_seen"] for _, info in parts))
        )
    return out, [h.get_state() for h in hosts]


@pytest.mark.parametrize("twins", [False, True])
def test_resume_on_another_host_count_reads_the_same_global_batches(twins):
    """A run of H hosts stopped at step s (mid-epoch and past an epoch's end) and resumed on H' hosts reads
    the global batches (row sets) an uninterrupted H-host run reads, and the row counters add up the same."""

    def hosts(count, n=102):
        return [
            TrainLoader(
                _rows(n),
                _fake_example,
                pairs_per_batch=24 // count,
                pad_id=0,
                seed=3,
                shard_index=h,
                shard_count=count,
                twins=twins,
                collate_fn=lambda exs: {"idx": [e.index for e in exs]},
            )
            for h in range(count)
        ]

    for before, after in ((2, 1), (1, 2), (2, 3), (3, 4), (4, 2), (6, 1)):
        whole, _ = _global_steps(hosts(before), 20)  # 4 steps an epoch: floor(102 / 24)
        for stop in (5, 11):
            _, states = _global_steps(hosts(before), stop)
            rest, _ = _global_steps(hosts(after), 20 - stop, states)
            assert rest == whole[stop:], (before, after, stop)
    # an H-host run resumed on H hosts takes each host's own state (as before)
    _, states = _global_steps(hosts(2), 3)
    assert _global_steps(hosts(2), 2, states)[0] == _global_steps(hosts(2), 5)[0][3:]


def test_resume_on_another_host_count_refuses_what_it_cannot_continue():
    def states(count, **kw):
        loaders = [
            _loader(n=60, pairs_per_batch=8 // count, shard_index=h, shard_count=count, **kw)
            for h in range(count)
        ]
        for ld in loaders:
            next(iter(ld))
        return [ld.get_state() for ld in loaders]

    with pytest.raises(
        ConfigError, match=r"data.length_groups=2 orders each host's own rows.*resume on 2 hosts"
    ):
        _loader(n=60, pairs_per_batch=8, length_groups=2, length_fn=lambda r, g, i: 1).set_states(
            states(2, length_groups=2, length_fn=lambda r, g, i: 1)
        )
    with pytest.raises(ConfigError, match="on_drop='refill' refills each host's batches from its own rows"):
        _loader(n=60, pairs_per_batch=8, on_drop="refill").set_states(states(2, on_drop="refill"))
    with pytest.raises(ConfigError, match="the global batch must stay the same"):
        _loader(n=60, pairs_per_batch=4).set_states(states(2))
    lagging = states(2)
    lagging[1]["position"] += 4
    with pytest.raises(ConfigError, match="different positions"):
        _loader(n=60, pairs_per_batch=8).set_states(lagging)
    with pytest.raises(ConfigError, match="seed"):  # set_state's own checks still apply
        _loader(n=60, pairs_per_batch=8, seed=4).set_states(states(2))


def test_refill_mode_fills_batches():
    loader = _loader(n=40, num_epochs=1, on_drop="refill")
    batches = list(loader)
    assert all(int(b["pair_mask"].sum()) == 4 for b, _ in batches)
    assert len(batches) <= loader.steps_per_epoch


def test_resume_state_mismatch_is_config_error():
    state = _loader().get_state()
    with pytest.raises(ConfigError, match="seed"):
        _loader(seed=4).set_state(state)
    with pytest.raises(ConfigError, match="num_rows"):
        _loader(n=100).set_state(state)


def test_loader_with_real_examples(synth_dir):
    from transformers import AutoTokenizer

    from alignx_jax.data.batching import make_example

    tok = AutoTokenizer.from_pretrained(os.path.join(ROOT, "alignx_jax", "assets", "tokenizer"))
    src = open_source(synth_dir)

    def example_fn(row, rng, index):
        return make_example(tok, row, method="ica", max_length=384, rng=rng, index=index, overflow="drop")

    loader = TrainLoader(
        src,
        example_fn,
        pairs_per_batch=4,
        pad_id=tok.pad_token_id or 0,
        buckets=(128, 256, 384),
        seed=0,
        shard_index=0,
        shard_count=1,
    )
    batch, info = next(iter(loader))
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] in (128, 256, 384)
    assert batch["direction"].shape == (4, 90)
    assert (batch["loss_mask"].sum(1)[np.concatenate([batch["pair_mask"]] * 2) == 1] > 0).all()
    assert info["rows_seen"] == 4


def test_partial_last_batch_and_all_rejected():
    loader = _loader(n=42, num_epochs=1, drop_remainder=False)
    batches = list(loader)
    assert loader.steps_per_epoch == 11 == len(batches)
    assert batches[-1][1]["rows_seen"] == 42
    # one pass over 9 held-out rows on 2 hosts: every row once (5 + 4), as many batches on each host
    hosts = [_loader(n=9, num_epochs=1, drop_remainder=False, shard_index=i, shard_count=2) for i in range(2)]
    seen = [list(h) for h in hosts]
    assert len(seen[0]) == len(seen[1]) == 2
    assert [b[-1][1]["rows_seen"] for b in seen] == [5, 4]
    indices = [i for b in seen for batch, _ in b for i in batch["index"][batch["pair_mask"] > 0]]
    assert sorted(int(i) for i in indices) == [i for i in range(9) if i % 7 != 3]  # 3 is _fake_example's drop
    never = TrainLoader(
        _rows(12),
        lambda row, rng, i: None,
        pairs_per_batch=4,
        pad_id=0,
        buckets=(8,),
        shard_index=0,
        shard_count=1,
        on_drop="refill",
    )
    with pytest.raises(DataError, match="rejected"):
        next(iter(never))
    padded = TrainLoader(
        _rows(12),
        lambda row, rng, i: None,
        pairs_per_batch=4,
        pad_id=0,
        buckets=(8,),
        shard_index=0,
        shard_count=1,
        num_epochs=1,
    )
    assert [int(b["pair_mask"].sum()) for b, _ in padded] == [0, 0, 0]  # equal steps on every host


def _len_example(row, rng, index):
    # lengths 3..40 that depend on the row only, so a grouped batch is visibly homogeneous
    n = 3 + (index * 37) % 38
    return DPOExample(prompt_ids=[5] * n, chosen_ids=[6, 2], rejected_ids=[7, 2], index=index)


def _len_of(row, rng, index):
    return _len_example(row, rng, index).length


def test_length_groups_cut_padding_keep_rows_and_resume():
    kw = dict(pairs_per_batch=4, pad_id=0, buckets=(8, 16, 32, 64), seed=5, shard_index=0, shard_count=1)
    plain = TrainLoader(_rows(83), _len_example, num_epochs=2, **kw)
    grouped = TrainLoader(_rows(83), _len_example, num_epochs=2, length_groups=5, length_fn=_len_of, **kw)
    for e in (0, 1):
        a, b = plain.shard_order(e), grouped.shard_order(e)
        assert sorted(a.tolist()) == sorted(b.tolist())  # the same rows each epoch...
        assert a[80:].tolist() == b[80:].tolist()  # ...the rows past the last full batch stay last
        assert b.tolist() != a.tolist()
    assert grouped.shard_order(0).tolist() != grouped.shard_order(1).tolist()  # reshuffled per epoch

    def padding(loader):
        return sum(int(bt["input_ids"].size - bt["attention_mask"].sum()) for bt, _ in loader)

    assert padding(grouped) < 0.5 * padding(plain)
    # each group of 5 batches holds rows of one length band: the batch's spread is small
    order = grouped.shard_order(0)
    for k in range(0, 80, 4):
        lens = [_len_of(None, None, int(i)) for i in order[k : k + 4]]
        assert max(lens) - min(lens) <= 12

    first = TrainLoader(_rows(83), _len_example, num_epochs=2, length_groups=5, length_fn=_len_of, **kw)
    it = iter(first)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(first.get_state()))
    again = TrainLoader(_rows(83), _len_example, num_epochs=2, length_groups=5, length_fn=_len_of, **kw)
    again.set_state(state)
    assert all(
        _same(x, y) for x, y in zip([next(it) for _ in range(4)], [next(iter(again)) for _ in range(4)])
    )
    with pytest.raises(ConfigError, match="length_groups"):
        TrainLoader(_rows(83), _len_example, num_epochs=2, **kw).set_state(state)
    with pytest.raises(ConfigError, match="length_groups"):
        TrainLoader(_rows(83), _len_example, length_groups=2, **kw)  # no length_fn


def test_twins_stay_in_one_batch_through_shuffle_hosts_and_length_groups():
    # rows 2k and 2k+1 are twins (alignx data contrast --twins); each must share a batch with its twin,
    # on every host, every epoch, shuffled and length-grouped, and resume where it stopped
    def batches(loader, epoch):
        order = loader.shard_order(epoch).tolist()
        return [order[k : k + loader.pairs_per_batch] for k in range(0, len(order), loader.pairs_per_batch)]

    kw = dict(pad_id=0, buckets=(8, 16, 32, 64), seed=3, num_epochs=2)
    for groups in (0, 3):
        seen = []
        for host in range(2):
            loader = TrainLoader(
                _rows(84), _len_example, pairs_per_batch=4, shard_index=host, shard_count=2,
                length_groups=groups, length_fn=_len_of, twins=True, **kw,
            )  # fmt: skip
            for e in (0, 1):
                for batch in batches(loader, e):
                    assert all(i ^ 1 in batch for i in batch), (groups, host, e, batch)
            seen.append(set(loader.shard_order(0).tolist()))
        assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 84  # the hosts split the units
    plain = TrainLoader(_rows(84), _len_example, pairs_per_batch=4, shard_index=0, shard_count=1, **kw)
    twins = TrainLoader(
        _rows(84), _len_example, pairs_per_batch=4, shard_index=0, shard_count=1, twins=True, **kw
    )
    assert any(i ^ 1 not in b for b in batches(plain, 0) for i in b)  # without twins they scatter
    assert batches(twins, 0) != batches(twins, 1)  # units reshuffled per epoch

    grouped = dict(pairs_per_batch=4, shard_index=0, shard_count=1, length_groups=3, length_fn=_len_of, **kw)
    first = TrainLoader(_rows(84), _len_example, twins=True, **grouped)
    it = iter(first)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(first.get_state()))
    again = TrainLoader(_rows(84), _len_example, twins=True, **grouped)
    again.set_state(state)
    assert all(
        _same(x, y) for x, y in zip([next(it) for _ in range(3)], [next(iter(again)) for _ in range(3)])
    )
    with pytest.raises(ConfigError, match="twins"):
        TrainLoader(_rows(84), _len_example, **grouped).set_state(state)
    with pytest.raises(DataError, match="even"):
        TrainLoader(_rows(83), _len_example, twins=True, **grouped)  # a row without its twin
    with pytest.raises(DataError, match="even"):
        TrainLoader(_rows(84), _len_example, twins=True, **{**grouped, "pairs_per_batch": 3})


def test_prepare_streams_keeps_extra_parquet_values_and_leaves_no_trace_on_failure(
    synth_dir, tmp_path, monkeypatch
):
    """`data prepare` reads one file at a time (rows and order as the raw reader's), keeps extra parquet
    fields JSON has no type for (timestamps, decimals, bytes) as text, and a bad row leaves --out as it was:
    no half-written TFDS folders, a user's file untouched."""
    import datetime
    import decimal

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [open_source(synth_dir)[i] for i in range(6)]
    src = tmp_path / "src"
    src.mkdir()
    when = datetime.datetime(2024, 1, 2, 3, 4, 5)
    extra = [dict(r, when=when, price=decimal.Decimal("1.50"), blob=b"\x00\x01") for r in rows[:3]]
    pq.write_table(pa.Table.from_pylist(extra), src / "a.parquet")
    (src / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[3:]))
    seen = []
    real_read = schema_mod.read_file

    def counting(path):
        seen.append(path)
        return real_read(path)

    monkeypatch.setattr(schema_mod, "read_file", counting)
    monkeypatch.setattr(schema_mod, "PARQUET_CHUNK", 2)  # the parquet file in record batches of 2 rows
    result = prepare(str(src), str(tmp_path / "ok"))
    monkeypatch.undo()
    assert result["splits"] == {"train": {"rows": 6, "skipped": 0}}
    assert seen == [str(src / "b.jsonl")]  # the JSONL file read once whole; the parquet one batch by batch
    got = open_source(str(tmp_path / "ok"))
    assert [got[i] for i in range(3, 6)] == rows[3:]
    assert got[0]["when"] == "2024-01-02T03:04:05" and got[0]["price"] == "1.50" and got[0]["blob"] == "AAE="
    assert {k: v for k, v in got[0].items() if k not in ("when", "price", "blob")} == rows[0]
    # a bad row in a later record batch of a parquet file is named by its row in the file
    bad = [dict(r) for r in rows]
    bad[4]["rejected"] = None
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad.parquet")
    monkeypatch.setattr(schema_mod, "PARQUET_CHUNK", 2)
    with pytest.raises(DataError, match=r"bad.parquet, row 4, field 'rejected'"):
        prepare(str(tmp_path / "bad.parquet"), str(tmp_path / "badout"))
    monkeypatch.undo()
    # a bad row in the second file: one line naming it; a new --out is not left behind, a user's keeps its file
    (src / "b.jsonl").write_text(json.dumps(rows[3]) + "\n" + json.dumps({**rows[4], "chosen": 5}) + "\n")
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    for out in (tmp_path / "new", user):
        r = _cli("data", "prepare", "--source", str(src), "--out", str(out))
        assert r.returncode == 1 and "b.jsonl, row 1, field 'chosen'" in r.stderr, r.stderr
        assert "Downloading and preparing" not in r.stdout + r.stderr
    assert not (tmp_path / "new").exists()
    assert sorted(os.listdir(user)) == ["notes.txt"] and (user / "notes.txt").read_text() == "mine"
    # a version folder already there (a killed run's, another tool's) is refused, not taken as finished
    (tmp_path / "half" / "alignx" / "1.0.0").mkdir(parents=True)
    with pytest.raises(DataError, match="already exists"):
        prepare(str(src), str(tmp_path / "half"))


def test_prepare_names_a_lone_surrogate_in_an_extra_field(synth_dir, tmp_path):
    """An extra field holding half an emoji ("\\ud83d" in JSON) passed the row checks (they read only the
    fields they know) and stopped `data prepare` with TFDS's traceback: one line naming the row and field."""
    rows = [open_source(synth_dir)[i] for i in range(2)]
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[1], "note": "\ud83d half"}) + "\n")
    with pytest.raises(
        DataError, match=r"rows.jsonl, row 1, field 'note': .*not valid Unicode text: \\ud83d"
    ):
        prepare(str(path), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    path.write_text(json.dumps({**rows[0], "\ud83d": 1}) + "\n")  # in a field's name too
    with pytest.raises(DataError, match=r"rows.jsonl, row 0, field '\\ud83d'"):
        prepare(str(path), str(tmp_path / "out"))
    path.write_text(json.dumps({**rows[0], "note": "\ud83d\ude00 مرحبا"}) + "\n")  # a whole emoji is stored
    prepare(str(path), str(tmp_path / "out"))
    assert open_source(str(tmp_path / "out"))[0]["note"] == "\U0001f600 مرحبا"


def test_folders_that_look_prepared_or_split_but_are_not_read_silently(synth_dir, tmp_path):
    """Another tool's dataset_info.json is not a prepared dataset; data files beside a folder's split
    sub-folders are refused (no command reads them); a prepared folder handed to `data check` says so."""
    rows = [open_source(synth_dir)[i] for i in range(4)]
    hf = tmp_path / "hf"
    (hf / "train").mkdir(parents=True)
    (hf / "train" / "dataset_info.json").write_text(json.dumps({"citation": "", "features": {}}))
    assert find_prepared(str(hf)) is None
    mix = tmp_path / "mix"
    (mix / "train").mkdir(parents=True)
    (mix / "train" / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    (mix / "more.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[2:]))
    for call in (lambda: open_source(str(mix)), lambda: prepare(str(mix), str(tmp_path / "out"))):
        with pytest.raises(
            DataError, match=r"1 data file\(s\) beside the split folders train/ would not be read"
        ):
            call()
    prepared = prepare(str(synth_dir), str(tmp_path / "p"))["dataset_dir"]
    for path in (str(tmp_path / "p"), prepared):
        r = _cli("data", "check", path)
        assert r.returncode == 1 and "a TFDS dataset folder: `alignx data prepare`'s" in r.stderr, r.stderr


def test_skipped_rows_are_named_where_training_reads_them(synth_dir, tmp_path, capsys):
    """data.skip_bad_rows: `alignx train` warns how many rows were left out and names the first."""
    from alignx_jax.train.setup import warn_skipped

    rows = [open_source(synth_dir)[i] for i in range(3)]
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n{not json\n" + json.dumps(rows[1]) + "\n")
    source = open_source(str(path), skip_bad=True)
    assert len(source) == 2 and source.skipped == 1
    warn_skipped(source, "training", is_main=True)
    err = capsys.readouterr().err
    assert "warning: 1 training row(s) skipped (data.skip_bad_rows), the first:" in err
    assert "rows.jsonl: line 2: invalid JSON" in err, err
    warn_skipped(open_source(synth_dir, skip_bad=True), "training", is_main=True)  # none skipped: silent
    assert capsys.readouterr().err == ""


def test_prepare_memory_benchmark_runs_and_reports_each_reader(tmp_path):
    """benchmarks/prepare_memory.py (BENCHMARKS.md §10) at a toy size: the rows it made, and each reader's
    peak from a process of its own, at least the bare imports' peak."""
    from conftest import load_benchmark

    out = tmp_path / "m.json"
    assert (
        load_benchmark("prepare_memory").main(["--users", "8", "--pairs-per-user", "3", "--json", str(out)])
        == 0
    )
    got = json.loads(out.read_text())
    assert got["rows"] == 24
    assert got["baseline"]["peak_rss_mib"] > 10
    # each reader imported what the baseline did and then read: its own peak is at least the baseline's
    assert all(got[k]["peak_rss_mib"] >= got["baseline"]["peak_rss_mib"] for k in ("prepare", "load_rows"))
    # the CPU by name and features, as every benchmark's JSON names it (it recorded platform.processor(): 'x86_64')
    from alignx_jax import hardware

    assert (got["machine"], got["cpu"], got["cpu_count"]) == (
        hardware.cpu_model(),
        hardware.cpu_features(),
        os.cpu_count(),
    )
