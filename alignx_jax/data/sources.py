"""Input pipeline: row sources (prepared TFDS array_record or raw files) and a resumable loader.

- `prepare(source, out_dir)` / `alignx data prepare`: validate rows (schema.load_rows) and write the
  `alignx` TFDS dataset (array_record, no TensorFlow; see data/tfds_builder.py) under `out_dir`.
- `open_source(path)`: random access to rows, from a prepared TFDS folder or raw parquet/JSON(L).
- `TrainLoader`: a deterministic, host-sharded, checkpointable DPO batch iterator.

The loader is a small deterministic one rather than a grain pipeline: its whole state is
(epoch, position in the epoch's shard), so `get_state()` is a tiny JSON dict that orbax can store
next to a checkpoint, and resuming needs no replay. Sources follow grain's random-access protocol
(`__len__`, `__getitem__`), so they also plug into `grain.MapDataset.source(...)` as they are.

Batch layout and determinism (per epoch e, seed s):
  * order: a permutation of all rows drawn from (s, e); host h of H takes positions h, h+H, ... of
    it, cut to floor(N / H) rows, so every host has the same number of steps (a multi-host step
    must be entered by all hosts);
  * length_groups=K (`data.length_groups`): the shuffled shard is cut into groups of K batches, each
    group sorted by the rows' token length (`length_fn`) and cut into batches, the batches of a group
    in a seeded random order; rows past the last full batch stay last. Batches then hold rows of
    similar length (little padding); the order is still a function of (s, e) alone;
  * twins (`data.twins`, files of `alignx data contrast --twins`): rows 2k and 2k+1 are one unit
    that the order, the host shards and the length groups move as a whole (a unit's length is its
    longer row's), so with an even batch both land in one batch;
  * example i of epoch e gets `rng = persona.history_rng(history, s, e, i)` (`data.history`; 'sample':
    `persona.row_rng(s, (e, i))`): the same history sample for the same row and epoch, however the
    batches are cut or resumed;
  * on_drop="pad" (default): every batch consumes exactly `pairs_per_batch` shard rows; rows the
    example_fn rejects (None) become dummy pairs (pair_mask 0). Steps per epoch are exact and equal
    on every host. on_drop="refill": rejected rows are replaced by the next rows so batches are full;
    steps per epoch are then an upper bound (and hosts may disagree if they drop differently).

Resuming on another host count (`set_states`): with on_drop="pad" and no length groups, step k of
epoch e reads rows perm[k*G : (k+1)*G] of the epoch's order whatever the count H (G: the global batch,
host h the ones at h, h+H, ...), and an epoch has floor(N / G) steps for any H; so H' hosts resume at
the same step of the same epoch, each at position k * G/H', and the same global batches follow (each
host holds other rows of them). The cumulative row counters are shared out so they add up as before.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from alignx_jax import paths
from alignx_jax.errors import ConfigError, DataError

STATE_VERSION = 1


HELD_OUT = "held_out"  # open_source's split for evaluation rows: validation, else test, else the only rows


def _held_out_split(splits: set[str]) -> str:
    return next((s for s in ("validation", "test") if s in splits), "train")


def host_share(total: int, index: int, count: int) -> int:
    """Host `index`'s part of a job-wide counter spread over `count` hosts (the parts add up to `total`)."""
    return total // count + (index < total % count)


class RowSource(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> dict: ...
    def where(self, index: int) -> tuple[str, int]: ...


class ListSource:
    """Rows held in memory (raw files, validated by schema.load_rows)."""

    def __init__(
        self,
        rows: Sequence[dict],
        *,
        skipped: int = 0,
        path: str = "",
        places: Sequence[tuple[str, int]] | None = None,
        first_skipped: str | None = None,
    ):
        self.rows, self.skipped, self.path = list(rows), skipped, path
        self.first_skipped = first_skipped  # the first skipped row's error (data.skip_bad_rows)
        self.places = places  # per row: (its file, its row number there)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]

    def where(self, index: int) -> tuple[str, int]:
        """(file, row number) of row `index`, for an error that names it."""
        return self.places[index] if self.places is not None else (self.path, index)

    def __repr__(self) -> str:
        return f"ListSource({self.path!r}, rows={len(self.rows)})"


class ArrayRecordSource:
    """Rows of one split of a prepared `alignx` TFDS dataset, decoded on access."""

    def __init__(self, dataset_dir: str, split: str = "train"):
        import tensorflow_datasets as tfds

        builder = tfds.builder_from_directory(dataset_dir)
        if split == HELD_OUT:
            split = _held_out_split(set(builder.info.splits))
        if split not in builder.info.splits:
            raise DataError(
                f"no split {split!r} (has: {', '.join(sorted(builder.info.splits))})", file=dataset_dir
            )
        self.path, self.split = dataset_dir, split
        self._ds = builder.as_data_source(split=split)

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int) -> dict:
        from alignx_jax.data.tfds_builder import decode_row

        return decode_row(self._ds[int(index)]["row"])

    def where(self, index: int) -> tuple[str, int]:
        """(dataset and split, record number) of row `index`, for an error that names it."""
        return f"{self.path} split {self.split}", index

    def __repr__(self) -> str:
        return f"ArrayRecordSource({self.path!r}, split={self.split!r}, rows={len(self)})"


def find_prepared(path: str) -> str | None:
    """The TFDS version folder under `path` (the data_dir, `alignx/`, or the version folder itself)."""
    if paths.is_url(path) or not os.path.isdir(path):  # prepared datasets are local folders
        return None
    for pattern in ("dataset_info.json", "*/dataset_info.json", "alignx/*/dataset_info.json"):
        hits = [h for h in sorted(glob.glob(os.path.join(path, pattern))) if _alignx_info(h)]
        if hits:
            return os.path.dirname(hits[-1])  # highest version string last
    return None


def _alignx_info(info_path: str) -> bool:
    """Whether a dataset_info.json is this builder's (another tool's, a Hugging Face `save_to_disk`, is not)."""
    import json

    try:
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("name") == "alignx"


def open_source(path: str, *, split: str = "train", kind: str = "auto", skip_bad: bool = False) -> RowSource:
    """Random access to rows: a prepared TFDS folder (`alignx data prepare --out`) or raw files.

    For raw folders holding `train/`, `test/` ... sub-folders (`alignx data split`), `split` picks one;
    HELD_OUT (`data.eval`) picks validation, else test, so a split's training half is never its eval set.
    """
    prepared = find_prepared(path)
    if prepared is not None:
        return ArrayRecordSource(prepared, split)
    from alignx_jax.data import schema

    splits = schema.split_folders(path)  # data files beside train/, test/ ... are refused there
    if split == HELD_OUT:
        split = _held_out_split(set(splits) & {"validation", "test"})
    path = splits.get(split, path)
    loaded = schema.load(path, kind=kind, skip_bad=skip_bad)
    return ListSource(
        loaded.rows,
        skipped=loaded.skipped,
        path=path,
        places=loaded.places,
        first_skipped=loaded.first_skipped,
    )


def prepare(source: str, out_dir: str, *, skip_bad: bool = False, kind: str = "auto") -> dict[str, Any]:
    """Validate `source` and write the `alignx` TFDS dataset (array_record) under `out_dir`."""
    if not paths.exists(source):
        raise DataError("no such file or folder", file=source)
    _refuse_out_inside_source(source, out_dir)
    import tensorflow_datasets as tfds

    from alignx_jax.data.tfds_builder import AlignX

    tfds.disable_progress_bar()
    builder = AlignX(
        source=paths.absolute(source),
        kind=kind,
        skip_bad=skip_bad,
        data_dir=out_dir,
        file_format="array_record",
    )
    if os.path.exists(builder.data_dir):  # TFDS would take any folder there as its finished dataset
        raise DataError(
            "a prepared dataset already exists there; choose another --out or remove it",
            file=builder.data_dir,
        )
    parent = os.path.dirname(builder.data_dir)  # OUT/alignx: TFDS writes OUT/alignx/incomplete.* first
    had_parent = os.path.isdir(parent)
    before = set(os.listdir(parent)) if had_parent else set()
    downloads = os.path.join(out_dir, "downloads")  # TFDS makes OUT/downloads/extracted, empty here
    had_out, had_downloads = os.path.exists(out_dir), os.path.exists(downloads)
    lock, removed, kept, writing, failed = None, [], [], False, True
    try:
        if not paths.is_url(out_dir):
            os.makedirs(parent, exist_ok=True)
            lock = _lock_folder(parent)
            removed, kept = _remove_killed_runs_folders(parent, proven=lock is not None)
            # a killed prepare's empty OUT/downloads/extracted go with its folder (they are no user's)
            had_downloads = had_downloads and not removed
        writing = True
        builder.download_and_prepare()
        failed = False
    except BaseException:  # a bad row, Ctrl-C: this call's temporary folders go, nothing else
        for name in set(os.listdir(parent)) - before if writing and os.path.isdir(parent) else ():
            if name.startswith("incomplete."):
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        raise
    finally:  # the empty folders this call made (OUT too when it failed): never a folder that was there
        if lock is not None:
            os.close(lock)
        made = [] if had_downloads else [os.path.join(downloads, "extracted"), downloads]
        if failed:
            made += [parent] * (not had_parent) + [out_dir] * (not had_out)
        for empty in made:
            if os.path.isdir(empty) and not os.listdir(empty):
                os.rmdir(empty)
    files = sorted(glob.glob(os.path.join(builder.data_dir, "*.array_record*")))
    return {
        "dataset_dir": builder.data_dir,
        "splits": builder.counts,
        "files": files,
        "removed": removed,
        "kept": kept,
    }


def _refuse_out_inside_source(source: str, out_dir: str) -> None:
    """A DataError where `out_dir` is the source folder or lies inside it: its TFDS files (dataset_info.json,
    features.json) would be read as rows by the next read of the source, this command's rerun too."""
    if paths.is_dir(source) and paths.within(out_dir, source):
        raise DataError(
            f"--out {out_dir} is inside the source folder: the next read of {source} would take the prepared "
            "dataset's JSON files for rows; choose an --out outside it",
            file=source,
        )


# TFDS's unfinished version folder (utils.incomplete_dir) and the files it writes there: the shards, the
# JSON files, their temporary names (utils.incomplete_file(s)) and the shuffler's buckets (writer.py, shuffle.py)
_INCOMPLETE_DIR = re.compile(r"incomplete\.[A-Z0-9]{6}_\d+\.\d+\.\d+")
_TFDS_FILE = re.compile(
    r"(incomplete\.[0-9a-f]{32}\.)?(alignx-[a-z]+\.array_record-\d{5}-of-\d{5}(_index\.json)?"
    r"|dataset_info\.json|features\.json)|bucket_[0-9a-f-]{36}_\d{3}\.tmp"
)


def _lock_folder(folder: str) -> int | None:
    """An open descriptor of `folder` holding its flock (released when closed, or by the kernel when the
    process dies); None where the file system has no flock. Another holder: a DataError."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        held = paths.try_flock(fd)
    except paths.LockHeld:
        os.close(fd)
        raise DataError(
            "another `alignx data prepare` is writing there; wait for it or choose another --out",
            file=folder,
        ) from None
    if held:
        return fd
    os.close(fd)
    return None  # no flock on this file system


def _remove_killed_runs_folders(parent: str, *, proven: bool) -> tuple[list[str], list[str]]:
    """(removed, kept): OUT/alignx's unfinished TFDS folders, a killed prepare's (no cleanup runs on SIGKILL).
    One is removed where that is proven: this process holds OUT/alignx's flock (`proven`; every prepare holds
    it while it writes, so none is writing there) and the folder holds only files TFDS writes."""
    removed, kept = [], []
    for name in sorted(os.listdir(parent)):
        folder = os.path.join(parent, name)
        if not _INCOMPLETE_DIR.fullmatch(name) or not os.path.isdir(folder):
            continue
        ours = not os.path.islink(folder) and all(
            e.is_file(follow_symlinks=False) and _TFDS_FILE.fullmatch(e.name) for e in os.scandir(folder)
        )
        if proven and ours:
            shutil.rmtree(folder)
            removed.append(folder)
        else:
            kept.append(folder)
    return removed, kept


def cli_prepare(args: argparse.Namespace) -> int:
    import sys

    result = prepare(args.source, args.out, skip_bad=args.skip_bad_rows)
    for folder in result["removed"]:
        print(f"removed {folder}: the unfinished folder of a prepare that was killed")
    for folder in result["kept"]:
        print(
            f"alignx: warning: {folder}: an unfinished TFDS folder, a killed prepare's or one this process "
            f"cannot tell is (no flock here, or files TFDS does not write); once no prepare writes to "
            f"{args.out}, remove it: rm -r {folder}",
            file=sys.stderr,
        )
    for split, c in result["splits"].items():
        first = f" (the first: {c['first_skipped']})" if c.get("first_skipped") else ""
        print(f"{split}: {c['rows']} rows written, {c['skipped']} skipped{first}")
    print(f"prepared: {result['dataset_dir']} ({len(result['files'])} array_record file(s))")
    return 0


# ------------------------------------------------------------------ the loader

ExampleFn = Callable[[dict, np.random.Generator, int], Any]


def shard_rows(num_rows: int, shard_count: int, *, twins: bool = False, drop_remainder: bool = True) -> int:
    """Rows of one host's shard in a `TrainLoader` epoch: equal shards of whole twin pairs, the rest next
    epoch; with drop_remainder=False (one pass over held-out rows) the longest shard, which every host is
    padded to so that each runs as many batches."""
    unit = 2 if twins else 1
    units = num_rows // unit
    return (units // shard_count if drop_remainder else -(-units // shard_count)) * unit


class TrainLoader:
    """Shuffled, sharded, resumable iterator of collated DPO batches.

    Iterating yields `(batch, info)`: `batch` the numpy dict of `batching.collate` (B =
    pairs_per_batch, dummy pairs for dropped rows), `info` = {epoch, step, rows_seen,
    rows_dropped, pairs} with cumulative counters. `num_epochs=None` iterates forever.
    """

    def __init__(
        self,
        source: RowSource,
        example_fn: ExampleFn,
        *,
        pairs_per_batch: int,
        pad_id: int,
        buckets: Sequence[int] | None = None,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        drop_remainder: bool = True,
        on_drop: str = "pad",
        shard_index: int | None = None,
        shard_count: int | None = None,
        collate_fn: Callable[..., dict] | None = None,
        length_groups: int = 0,
        length_fn: Callable[[Any, np.random.Generator, int], int] | None = None,
        twins: bool = False,
        history: str = "sample",
    ):
        if pairs_per_batch < 1:
            raise ConfigError(f"pairs_per_batch must be >= 1, got {pairs_per_batch}")
        if length_groups < 0 or (length_groups and length_fn is None):
            raise ConfigError(f"length_groups must be >= 0 (with a length_fn), got {length_groups}")
        if on_drop not in ("pad", "refill"):
            raise ConfigError(f"on_drop must be 'pad' or 'refill', got {on_drop!r}")
        if shard_index is None or shard_count is None:
            import jax

            shard_index = jax.process_index() if shard_index is None else shard_index
            shard_count = jax.process_count() if shard_count is None else shard_count
        if not 0 <= shard_index < shard_count:
            raise ConfigError(f"shard_index {shard_index} outside [0, {shard_count})")
        self.source, self.example_fn = source, example_fn
        self.pairs_per_batch, self.pad_id, self.seed = int(pairs_per_batch), int(pad_id), int(seed)
        self.shuffle, self.num_epochs, self.drop_remainder, self.on_drop = (
            shuffle,
            num_epochs,
            drop_remainder,
            on_drop,
        )
        self.shard_index, self.shard_count = int(shard_index), int(shard_count)
        self.num_rows = len(source)
        from alignx_jax.data.persona import history_rng

        history_rng(history, 0, 0, 0)  # a one-line ConfigError for an unknown mode, before any row
        self.history = history
        # rows that move as one (module docstring, twins)
        self.unit = 2 if twins else 1
        if self.num_rows % self.unit or self.pairs_per_batch % self.unit:
            raise DataError(
                f"data.twins: {self.num_rows} rows and batches of {self.pairs_per_batch} pairs per host must "
                "both be even (rows 2k and 2k+1 are twins and share a batch)"
            )
        self.shard_size = shard_rows(
            self.num_rows, self.shard_count, twins=twins, drop_remainder=drop_remainder
        )
        if self.shard_size == 0:
            raise DataError(f"{self.num_rows} rows cannot feed {self.shard_count} hosts")
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"a host's {self.shard_size} rows make no full batch of {pairs_per_batch} pairs "
                "(lower pairs_per_batch or set drop_remainder=False)"
            )
        if collate_fn is None:
            from alignx_jax.data import batching

            kw = {} if buckets is None else {"buckets": tuple(buckets)}

            def collate_fn(exs: Sequence[Any]) -> dict[str, np.ndarray]:
                return batching.collate(exs, pad_id=self.pad_id, num_pairs=self.pairs_per_batch, **kw)

        self.collate_fn = collate_fn
        self.length_groups, self.length_fn = int(length_groups), length_fn
        self._epoch, self._position, self._step = 0, 0, 0
        self._rows_seen, self._rows_dropped = 0, 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    # -- sizes
    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch on this host (exact for on_drop='pad', an upper bound for 'refill')."""
        full, rest = divmod(self.shard_size, self.pairs_per_batch)
        return full + (0 if self.drop_remainder or rest == 0 else 1)

    def __len__(self) -> int:
        """Batches in the whole run (num_epochs * steps_per_epoch; one epoch's for an endless loader)."""
        if self.num_epochs is None:
            return self.steps_per_epoch
        return self.num_epochs * self.steps_per_epoch

    # -- order
    def shard_order(self, epoch: int) -> np.ndarray:
        """Row indices this host reads in `epoch`, in order."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        units = self.num_rows // self.unit
        if self.shuffle:
            perm = np.random.default_rng([self.seed, epoch]).permutation(units)
        else:
            perm = np.arange(units)
        mine = perm[self.shard_index :: self.shard_count][: self.shard_size // self.unit]
        order = (mine[:, None] * self.unit + np.arange(self.unit)).reshape(-1)
        if self.length_groups and self.shuffle:
            order = self._length_grouped(order, epoch)
        self._order_cache = (epoch, order)
        return order

    def _length_grouped(self, order: np.ndarray, epoch: int) -> np.ndarray:
        """`order` regrouped by token length (module docstring); the rows past the last full batch
        keep their place at the end, so every batch is still a fixed slice of the shard."""
        b, u = self.pairs_per_batch, self.unit
        full = len(order) - len(order) % b
        lengths = np.asarray(
            [
                self.length_fn(self.source[int(i)], self._example_rng(epoch, int(i)), int(i))
                for i in order[:full]
            ]
        )
        # sorted by unit (twins: the longer row's length), batches cut in rows
        units_UR, lengths_U = order[:full].reshape(-1, u), lengths.reshape(-1, u).max(-1)
        rng = np.random.default_rng([self.seed, epoch, 0x4C47])
        span = self.length_groups * b // u
        batches = []
        for s in range(0, len(units_UR), span):
            group = units_UR[s : s + span][np.argsort(-lengths_U[s : s + span], kind="stable")].reshape(-1)
            cut = [group[k : k + b] for k in range(0, len(group), b)]
            batches += [cut[j] for j in rng.permutation(len(cut))]
        return np.concatenate([*batches, order[full:]]).astype(order.dtype)

    def _example_rng(self, epoch: int, index: int) -> np.random.Generator | None:
        from alignx_jax.data.persona import history_rng

        return history_rng(self.history, self.seed, epoch, index)

    # -- state
    def get_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "num_rows": self.num_rows,
            "shard_index": self.shard_index,
            "shard_count": self.shard_count,
            "pairs_per_batch": self.pairs_per_batch,
            "shuffle": self.shuffle,
            "on_drop": self.on_drop,
            "length_groups": self.length_groups,
            "twins": self.unit == 2,
            "history": self.history,
            "epoch": self._epoch,
            "position": self._position,
            "step": self._step,
            "rows_seen": self._rows_seen,
            "rows_dropped": self._rows_dropped,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}")
        mine = self.get_state()
        # options added after the state's first version: absent from an older state means their default
        later = {"length_groups": 0, "twins": False, "history": "sample"}
        for key in (
            "seed",
            "num_rows",
            "shard_index",
            "shard_count",
            "pairs_per_batch",
            "shuffle",
            "on_drop",
            *later,
        ):
            saved = state.get(key, later.get(key))
            if saved != mine[key]:
                raise ConfigError(
                    f"cannot resume the data loader: saved {key}={saved!r} but this run has {mine[key]!r} "
                    "(the same data, data options, seed and hosts are needed)"
                )
        self._epoch, self._position, self._step = (
            int(state["epoch"]),
            int(state["position"]),
            int(state["step"]),
        )
        self._rows_seen, self._rows_dropped = int(state["rows_seen"]), int(state["rows_dropped"])

    def set_states(self, states: Sequence[dict[str, Any]]) -> None:
        """Resume from the states every host of the saved run wrote (`states[i]`: host i's). On as many
        hosts, each takes its own; on another count, this host's share of where they were (module
        docstring, resuming on another host count): the same global batches follow."""
        saved = len(states)
        if saved == self.shard_count:
            return self.set_state(states[self.shard_index])
        if not states or any(s.get("shard_count") != saved for s in states):
            raise ConfigError(
                f"cannot resume the data loader: the checkpoint holds {saved} host states, which name "
                f"{sorted({s.get('shard_count') for s in states})} hosts"
            )
        first = states[0]
        # only pad-mode, ungrouped shards are strided slices of one order, whose step k is the same rows
        # perm[k*G : (k+1)*G] for any host count; grouping sorts each host's own shard
        why = None
        if first.get("on_drop") != "pad":
            why = f"on_drop={first.get('on_drop')!r} refills each host's batches from its own rows"
        elif first.get("length_groups", 0) and first.get("shuffle"):
            why = f"data.length_groups={first.get('length_groups')} orders each host's own rows"
        if why:
            raise ConfigError(
                f"cannot resume on {self.shard_count} hosts the data loader of a run on {saved}: {why}, so "
                f"another count reads other batches (resume on {saved} hosts, or start a new workdir)"
            )
        if len({(s.get("epoch"), s.get("position"), s.get("step")) for s in states}) > 1:
            raise ConfigError("cannot resume the data loader: the saved hosts stopped at different positions")
        if first.get("pairs_per_batch", 0) * saved != self.pairs_per_batch * self.shard_count:
            raise ConfigError(
                f"cannot resume the data loader: the saved run read {first.get('pairs_per_batch')} pairs per "
                f"host on {saved} hosts, this one {self.pairs_per_batch} on {self.shard_count} (the global batch "
                "must stay the same)"
            )
        done, rest = divmod(int(first["position"]), int(first["pairs_per_batch"]))
        if rest:
            raise ConfigError(
                f"cannot resume the data loader: saved position {first['position']} is mid-batch"
            )
        seen, dropped = (sum(int(s[k]) for s in states) for k in ("rows_seen", "rows_dropped"))
        self.set_state(
            {
                **first,
                "shard_index": self.shard_index,
                "shard_count": self.shard_count,
                "pairs_per_batch": self.pairs_per_batch,
                "position": done * self.pairs_per_batch,
                "rows_seen": host_share(seen, self.shard_index, self.shard_count),
                "rows_dropped": host_share(dropped, self.shard_index, self.shard_count),
            }
        )

    # -- iteration
    def __iter__(self) -> Iterator[tuple[dict[str, np.ndarray], dict[str, int]]]:
        return self

    def _finished(self) -> bool:
        return self.num_epochs is not None and self._epoch >= self.num_epochs

    def _next_epoch_if_done(self) -> None:
        full = (
            self.shard_size - self.shard_size % self.pairs_per_batch
            if self.drop_remainder
            else self.shard_size
        )
        if self._position >= full:
            self._epoch, self._position = self._epoch + 1, 0

    def __next__(self) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        empty_epochs = 0
        while True:
            self._next_epoch_if_done()
            if self._finished():
                raise StopIteration
            epoch, order = self._epoch, self.shard_order(self._epoch)
            start, examples = self._position, []
            # In pad mode a batch owns a fixed slice of the shard; in refill mode it reads on until full.
            limit = self._position + self.pairs_per_batch if self.on_drop == "pad" else self.shard_size
            while self._position < min(limit, self.shard_size) and len(examples) < self.pairs_per_batch:
                if self._position >= len(order):  # a shorter shard's end (drop_remainder=False): padding
                    self._position += 1
                    continue
                index = int(order[self._position])
                self._position += 1
                self._rows_seen += 1
                ex = self.example_fn(self.source[index], self._example_rng(epoch, index), index)
                if ex is None:
                    self._rows_dropped += 1
                else:
                    examples.append(ex)
            short = len(examples) < self.pairs_per_batch
            if self.on_drop == "refill" and (not examples or (short and self.drop_remainder)):
                # The shard's tail cannot fill a batch: on to the next epoch (a whole epoch of
                # rejected rows would loop forever, so that is an error).
                empty_epochs = empty_epochs + 1 if start == 0 and not examples else 0
                if empty_epochs:
                    raise DataError(
                        f"every row of epoch {epoch} was rejected by the example function "
                        "(all prompts too long?)"
                    )
                self._epoch, self._position = self._epoch + 1, 0
                continue
            batch = self.collate_fn(examples)
            self._step += 1
            info = {
                "epoch": epoch,
                "step": self._step,
                "rows_seen": self._rows_seen,
                "rows_dropped": self._rows_dropped,
                "pairs": len(examples),
            }
            return batch, info
