"""Training checkpoints: an orbax CheckpointManager over `W/checkpoints/<step>/{params,opt_state,head?,meta}`.

`params` is the decoder's parameter state as a pure dict (the layout `alignx export` restores),
`opt_state` the optax state, `head` (PBA runs only) the preference head's parameters as a pure
dict, `meta` JSON (step, rng seed, data-loader state, and for a head its `HeadConfig` under
`head_config`). Saves are asynchronous by default: the step loop continues while the arrays are
written; `wait()` blocks until the last save is durable (before exit and before deciding a run is
finished), and `check_background()` raises a failed background write's error without waiting (a
one-process run's trainer calls it every step).

Integrity: `meta['checksums']` holds a digest of every saved array (`digests`: two position-weighted
uint32 sums of the array's bits, computed on the devices in one jitted pass, so they do not depend on
the sharding and every process of a multi-host run gets the same numbers). A save refuses arrays that
are not finite; a restore recomputes the digests and checks finiteness, and `restore_newest_good`
falls back to the newest step that verifies, moving the bad ones to `W/checkpoints.bad/`.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from alignx_jax import paths
from alignx_jax.errors import CheckpointError

ITEMS = ("params", "opt_state", "head", "meta")
ARRAY_ITEMS = ("params", "opt_state", "head")
BAD_DIR_SUFFIX = ".bad"  # W/checkpoints.bad/<step>.<time>: steps that failed verification, kept for a look


class _RestoreAfterEffects(logging.Filter):
    """Drops the known after-effects of a failed restore, whose own error is reported once, as one line:
    orbax's other reads of the damaged step fail too and asyncio logs each as 'Task exception was never
    retrieved', and reads still in flight finish after its event loop closed ('Event loop is closed',
    logged by concurrent.futures for each done-callback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if _closed_loop(exc):
            return False
        return not (
            str(record.msg).startswith("Task exception was never retrieved")
            and "Encountered error while reading array index" in str(exc)
        )


def _closed_loop(exc: BaseException | None) -> bool:
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _abandoned_read(info) -> bool:
    """A read coroutine of a failed restore, finalized later than `collect_orphans` (still in flight
    then; the interpreter reports it at exit as 'Exception ignored in: <coroutine ...>')."""
    name = getattr(info.object, "__qualname__", "") or getattr(info.object, "__name__", "")
    return "_read_array_index" in str(name) and "Encountered error while reading array index" in str(
        info.exc_value
    )


class _ItemMetadataNotice(logging.Filter):
    """Drops orbax's warning that an item folder (`W/checkpoints/<step>/params`) has no metadata file of its
    own: a CheckpointManager step keeps it one level up, so every read of a training step's params logged it
    as though something were missing. The warning about any other folder passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Metadata file does not exist") or not record.args:
            return True
        missing = str(record.args[0])
        step_dir = os.path.dirname(os.path.dirname(missing))
        return not os.path.exists(os.path.join(step_dir, os.path.basename(missing)))


class MetadataFailure(logging.Filter):
    """Drops orbax's warning that it could not read an item's metadata (the caller says so itself, or the
    restore that follows fails or verifies)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to get item metadata")


class _SaveFailureReport(logging.Filter):
    """Drops orbax's tracebacks of a failed background save (its commit thread's and its finalize thread's,
    a full disk's say): the `TrainCheckpointer` save, wait or close that meets the error next raises it as
    one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not (
            "Commit callback in background save thread" in msg
            or "[wait_until_finished] Save Finalize thread" in msg
        )


def _quiet_closed_loop_callbacks() -> None:
    """The same after-effect reaches Python from tensorstore's threads (sys.excepthook or the unraisable
    hook, depending on the path): those hooks skip it and pass everything else on."""
    for name in ("concurrent.futures", "asyncio"):
        logging.getLogger(name).addFilter(_RestoreAfterEffects())
    except_hook, unraisable_hook = sys.excepthook, sys.unraisablehook

    def excepthook(kind, value, tb):
        if not _closed_loop(value):
            except_hook(kind, value, tb)

    def unraisablehook(info):
        if not _closed_loop(info.exc_value) and not _abandoned_read(info):
            unraisable_hook(info)

    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


_quiet_closed_loop_callbacks()
logging.getLogger("absl").addFilter(_ItemMetadataNotice())  # orbax logs through absl
logging.getLogger("absl").addFilter(_SaveFailureReport())


def first_line(e: BaseException) -> str:
    """One readable line of an exception: tensorstore/pybind reprs and addresses cut off."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    line = re.split(r"\s*See full TensorStore details|<bound method|<built-in method", line)[0]
    line = re.sub(r" at 0x[0-9a-f]+", "", line).rstrip(" :.(")
    return line[:240] + ("..." if len(line) > 240 else "")


def collect_orphans() -> None:
    """After a failed orbax read: collect the read coroutines it abandoned, without the interpreter's
    'Exception ignored in: <coroutine ...>' report (with a TensorStore repr) of each on stderr."""
    old = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        gc.collect()
    finally:
        sys.unraisablehook = old


# ----------------------------------------------------------------------------- array digests


def leaf_name(path) -> str:
    """A tree path as 'a/b/0' (a dict key and a list index alike)."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts) or "."


def _bits_u32(x: jax.Array) -> jax.Array:
    """The array's bit pattern as uint32 (one value per element; 64-bit types give two)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    as_uint = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, as_uint).astype(jnp.uint32)


def _leaf_digest(x: jax.Array) -> jax.Array:
    """[2] uint32 digest of one array. Per-dimension iotas instead of a reshape: a sharded array is
    never regathered; uint32 sums wrap, so the result does not depend on the order of the reduction
    (and so not on the sharding)."""
    bits = _bits_u32(x)
    idx = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(bits.ndim)):
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, d) * jnp.uint32(stride % 2**32)
        stride *= bits.shape[d]
    # odd weights: a change of any one word always changes the sum
    weighted = jnp.sum(bits * (idx * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
    mixed = (bits ^ (idx * jnp.uint32(0x9E3779B9))) * jnp.uint32(0x85EBCA6B)
    mixed = jnp.sum(mixed ^ (mixed >> 13), dtype=jnp.uint32)
    return jnp.stack([weighted, mixed])


def _leaf_finite(x: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)


_digest_tree = jax.jit(lambda tree: (jax.tree.map(_leaf_digest, tree), jax.tree.map(_leaf_finite, tree)))


def digests(tree: Any) -> tuple[dict[str, str], list[str]]:
    """({leaf name: 16 hex digits}, names of leaves holding NaN/inf) of a tree of arrays."""
    named = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not named:
        return {}, []
    sums, finite = jax.device_get(_digest_tree(tree))
    names, bad = {}, []
    for (path, _), dig, ok in zip(named, jax.tree.leaves(sums), jax.tree.leaves(finite)):
        name = leaf_name(path)
        d = np.asarray(dig, np.uint32)
        names[name] = f"{int(d[0]):08x}{int(d[1]):08x}"
        if not bool(ok):
            bad.append(name)
    return names, bad


def verify_tree(tree: Any, expected: dict[str, str] | None, where: str) -> None:
    """CheckpointError naming the first leaf that is not finite or does not match its saved digest."""
    got, bad = digests(tree)
    if bad:
        raise CheckpointError(
            f"{where}: {bad[0]} holds NaN/inf values" + (f" ({len(bad)} arrays do)" if len(bad) > 1 else "")
        )
    if expected is None:  # written before checksums existed: finiteness is all we can check
        return
    # leaves both sides name (a model checkpoint restores the Params of a state saved whole)
    wrong = [k for k in sorted(set(got) & set(expected)) if got[k] != expected[k]]
    if wrong:
        raise CheckpointError(
            f"{where}: {wrong[0]} does not match its checksum (corrupt data)"
            + (f"; {len(wrong)} arrays differ" if len(wrong) > 1 else "")
        )


def in_stored_dtypes(abstract: Any, stored: dict[str, Any]) -> Any:
    """The restore target `abstract` (ShapeDtypeStructs) with each array in its stored dtype (`stored`: {leaf
    name: dtype}; a leaf it lacks keeps its own): the saved digests are of the stored bits."""
    return jax.tree_util.tree_map_with_path(
        lambda p, a: jax.ShapeDtypeStruct(
            a.shape, stored.get(leaf_name(p), a.dtype), sharding=getattr(a, "sharding", None)
        ),
        abstract,
    )


def stored_dtypes(metadata_tree: Any) -> dict[str, Any]:
    """{leaf name: dtype} of an orbax item's metadata tree."""
    return {
        leaf_name(p): jnp.dtype(x.dtype)
        for p, x in jax.tree_util.tree_flatten_with_path(metadata_tree)[0]
        if hasattr(x, "dtype")
    }


def cast_like(tree: Any, like: Any) -> Any:
    """`tree`'s arrays in `like`'s dtypes (`tree` itself when none differs), each stored-dtype array freed
    once cast (peak: one more array)."""
    if all(x.dtype == a.dtype for x, a in zip(jax.tree.leaves(tree), jax.tree.leaves(like))):
        return tree

    def cast(x: jax.Array, a: Any) -> jax.Array:
        if x.dtype == a.dtype:
            return x
        y = x.astype(a.dtype)
        x.delete()
        return y

    return jax.tree.map(cast, tree, like)


# ----------------------------------------------------------------------------- the manager


META_DIGEST = "meta_sha256"  # in a step's meta: the digest of the rest of it (`meta_digest`)


def meta_digest(meta: dict[str, Any]) -> str:
    """sha256 of a step's JSON meta as canonical JSON (what JSON round-trips: a tuple is saved as a list)."""
    text = json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _raised_in_barrier(e: BaseException) -> bool:
    """Whether `e` came out of orbax's process barrier itself (then every process has been through it)."""
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name in ("sync_global_processes", "sync_global_devices"):
            return True
        tb = tb.tb_next
    return False


def _all_processes(ok: bool) -> bool:
    """`ok` on every process (an all-gather every process joins)."""
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray([ok], np.int32))))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class TrainCheckpointer:
    """Save/restore params + optimizer state (+ head) + JSON meta by step, keeping the newest `keep`."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = paths.absolute(directory)  # a gs:// URL stays one: orbax writes it
        # cleanup_tmp_directories: a save cut by a kill leaves `<step>.orbax-checkpoint-tmp-*`; drop it
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max(1, int(keep)),
            create=True,
            enable_async_checkpointing=bool(async_save),
            cleanup_tmp_directories=True,
        )
        try:
            self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        except OSError as e:
            raise CheckpointError(f"{self.directory}: cannot open ({e.strerror or first_line(e)})") from None

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def has_head(self, step: int) -> bool:
        return paths.path(os.path.join(self.directory, str(int(step)), "head")).is_dir()

    def save(self, step: int, params: Any, opt_state: Any, meta: dict[str, Any], head: Any = None) -> None:
        """Save one step; the arrays are checked finite and their digests go into meta['checksums']."""
        trees = {"params": params, "opt_state": opt_state}
        if head is not None:
            trees["head"] = head
        sums = {}
        for item, tree in trees.items():
            sums[item], bad = digests(tree)
            if bad:  # never write a state that cannot be resumed from
                raise CheckpointError(f"step {step}: {item} {bad[0]} holds NaN/inf values; not saved")
        meta = {**meta, "checksums": sums}
        items = dict(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave({**meta, META_DIGEST: meta_digest(meta)}),
        )
        if head is not None:  # an item left out of the Composite is simply not written for this step
            items["head"] = ocp.args.StandardSave(head)
        # orbax waits for the previous save first: its failed write is named as that, not as this step's
        self.wait()
        try:
            self._mngr.save(int(step), args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # a full disk, or an earlier async save that failed
            raise CheckpointError(f"{self.directory}/{step}: cannot save ({first_line(e)})") from None

    def restore(
        self,
        step: int,
        abstract_params: Any,
        abstract_opt_state: Any,
        abstract_head: Any = None,
        *,
        verify: bool = True,
    ) -> tuple[Any, ...]:
        """Restore straight into the shardings carried by the abstract trees (ShapeDtypeStructs).

        Returns (params, opt_state, meta), or (params, opt_state, meta, head) when `abstract_head`
        is given (CheckpointError if that step has no head). `verify`: every array is checked finite
        and against the digest saved with it (CheckpointError naming the first that fails).
        """
        where = f"{self.directory}/{step}"
        # each array restored in its stored dtype (a resume may change model.param_dtype), cast once verified
        wanted = {"params": abstract_params, "opt_state": abstract_opt_state}
        if abstract_head is not None:
            if not self.has_head(step):
                raise CheckpointError(
                    f"{where}: no head/ item (the run that wrote it trained no preference head)"
                )
            wanted["head"] = abstract_head
        items = {
            item: ocp.args.StandardRestore(in_stored_dtypes(tree, self._stored_dtypes(step, item)))
            for item, tree in wanted.items()
        }
        items["meta"] = ocp.args.JsonRestore()
        why, in_barrier = None, False
        try:
            out = self._mngr.restore(int(step), args=ocp.args.Composite(**items))
        except Exception as e:  # a truncated, half-written or different-model checkpoint
            why = f"{type(e).__name__}: {first_line(e)}"
            in_barrier = _raised_in_barrier(e)
        if why is not None:  # outside the handler: the failed read's frames are free to be collected
            collect_orphans()
        if jax.process_count() > 1:
            # a file only this process reads can fail here alone: every process must then give the step
            # up together, or the others wait in orbax's barrier and verify_tree's collectives for ever
            if why is not None and not in_barrier:
                self._join_restore_barrier()
            if not _all_processes(why is None):
                why = why or "it failed to restore on another process"
        if why is not None:
            raise CheckpointError(f"{where}: cannot restore ({why})")
        meta = dict(out["meta"])
        if verify:
            # the step, the loader position and the counters a resume continues from, and the arrays' digests
            saved = meta.pop(META_DIGEST, None)
            if saved is not None and saved != meta_digest(meta):
                raise CheckpointError(f"{where}/meta: does not match its checksum (corrupt data)")
            if int(meta.get("step", step)) != int(step):
                raise CheckpointError(f"{where}/meta: names step {meta.get('step')} (corrupt data)")
            sums = meta.get("checksums") or {}
            for item in ARRAY_ITEMS:
                if item in items:
                    verify_tree(out[item], sums.get(item), f"{where}/{item}")
        cast = {item: cast_like(out[item], tree) for item, tree in wanted.items()}
        if verify and any(cast[item] is not out[item] for item in wanted):  # an overflow of the new dtype
            for item in wanted:
                verify_tree(cast[item], None, f"{where}/{item}")
        res = (cast["params"], cast["opt_state"], meta)
        return res + (cast["head"],) if abstract_head is not None else res

    def _stored_dtypes(self, step: int, item: str) -> dict[str, Any]:
        """{leaf name: dtype} an item of a step was saved in; {} when its metadata is unreadable (the restore
        then reads it in the target's dtypes, and fails or verifies as it would)."""
        quiet = MetadataFailure()
        logging.getLogger("absl").addFilter(quiet)  # orbax logs a failed read as a warning and goes on
        try:
            with ocp.StandardCheckpointer() as ckptr:
                meta = ckptr.metadata(os.path.join(self.directory, str(int(step)), item))
        except Exception:
            return {}
        finally:
            logging.getLogger("absl").removeFilter(quiet)
        tree = getattr(meta, "item_metadata", meta)
        return stored_dtypes(getattr(tree, "tree", tree))

    def _join_restore_barrier(self) -> None:
        """The barrier orbax's Checkpointer.restore ends with, which a process whose read failed never
        reached: the processes whose read succeeded wait in it."""
        try:  # orbax's own barrier function and the key's parts (0.12): private, so looked up
            from orbax.checkpoint._src.multihost import multihost as ocp_multihost

            ckptr = self._mngr._checkpointer
        except (ImportError, AttributeError):  # another orbax layout: the others' barrier times out instead
            return
        prefix = getattr(ckptr, "_barrier_sync_key_prefix", None)
        ocp_multihost.sync_global_processes(
            ocp_multihost.unique_barrier_key("Checkpointer:restore", prefix=prefix),
            processes=getattr(ckptr, "_active_processes", None),
        )

    def restore_newest_good(
        self,
        abstract_params: Any,
        abstract_opt_state: Any,
        abstract_head: Any = None,
        *,
        warn: Callable[[str], None] | None = None,
    ) -> tuple[int, tuple[Any, ...]] | None:
        """(step, restore(...)) of the newest step that restores and verifies, None without steps.

        Newer steps that fail are reported through `warn` (one line each) and moved to
        `W/checkpoints.bad/` so that they are never used (nor kept as "newest" by the manager);
        CheckpointError, with nothing moved, when no step verifies (a different model or config).
        """
        failures: list[tuple[int, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                out = self.restore(step, abstract_params, abstract_opt_state, abstract_head)
            except CheckpointError as e:
                if any(w in str(e).lower() for w in ("resource_exhausted", "out of memory")):
                    raise  # the machine, not the step: never move a checkpoint aside for it
                failures.append((step, str(e)))
                continue
            for bad, why in failures:
                dest = self._quarantine(bad)
                if warn is not None:
                    warn(f"{why}; moved to {dest}; resuming from step {step}")
            return step, out
        if failures:
            step, why = failures[0]
            raise CheckpointError(
                f"no saved step verifies ({len(failures)} tried; newest: {why}); "
                f"delete {self.directory} to start over"
            )
        return None

    def newest_good_step(
        self,
        abstract_params: Any,
        abstract_opt_state: Any,
        abstract_head: Any = None,
        below: int | None = None,
    ) -> int | None:
        """The newest step (below `below`) that restores and verifies; nothing is moved or returned."""
        for step in sorted(self.all_steps(), reverse=True):
            if below is not None and step >= below:
                continue
            try:
                self.restore(step, abstract_params, abstract_opt_state, abstract_head)
            except CheckpointError:
                continue
            return step
        return None

    def _quarantine(self, step: int) -> str:
        dest = os.path.join(self.directory + BAD_DIR_SUFFIX, f"{step}.{int(time.time())}")
        if jax.process_index() == 0:
            paths.path(os.path.dirname(dest)).mkdir(parents=True, exist_ok=True)
            if paths.is_url(self.directory):
                paths.path(os.path.join(self.directory, str(step))).rename(dest)
            else:
                shutil.move(os.path.join(self.directory, str(step)), dest)
        _sync(f"quarantine_{step}")
        self._mngr.reload()
        return dest

    def wait(self) -> None:
        try:
            self._mngr.wait_until_finished()
        except Exception as e:  # the background write failed (e.g. a full disk)
            raise CheckpointError(f"{self.directory}: a checkpoint write failed ({first_line(e)})") from None

    def check_background(self) -> None:
        """`wait`'s CheckpointError once a background write has failed; returns at once while one still runs.
        Cheap enough for every step: a failed save stops the run then, not at the next save."""
        # not orbax's check_for_errors: it takes the error from under its finalize thread, which may then
        # finalize the failed step's folder as a checkpoint
        if not self._mngr.is_saving_in_progress():
            self.wait()  # every background thread is done: nothing is waited for, a failure is raised

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._mngr.close()


def read_meta(checkpoints_dir: str, step: int) -> dict[str, Any]:
    """The JSON `meta` item of one saved step (no arrays are read)."""
    mngr = ocp.CheckpointManager(paths.absolute(checkpoints_dir), item_names=ITEMS)
    try:
        out = mngr.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:
        raise CheckpointError(f"{checkpoints_dir}/{step}: cannot read meta ({first_line(e)})") from None
    finally:
        mngr.close()
    return dict(out["meta"])


def saved_checksums(checkpoints_dir: str, step: int, item: str) -> dict[str, str] | None:
    """The digests saved with one item of a step, None when there is no such step or its meta has no
    checksums (written before they existed); CheckpointError when the step's meta is gone."""
    step_dir = os.path.join(checkpoints_dir, str(int(step)))
    path = os.path.join(step_dir, "meta", "metadata")
    if not paths.path(path).is_file():
        if paths.path(step_dir).is_dir():  # every step is saved with its meta: train refuses it too
            raise CheckpointError(
                f"{path}: not found (the step's meta, with its checksums; a damaged checkpoint)"
            )
        return None
    try:
        meta = json.loads(paths.path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({first_line(e)})") from None
    return (meta.get("checksums") or {}).get(item) if isinstance(meta, dict) else None


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree of arrays: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
