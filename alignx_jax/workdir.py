"""The training workdir's guards: one writer at a time, no silent config change on resume, and
fingerprints that key the files a run derives from its inputs (precomputed reference log-probs,
predicted profiles, synthetic data) so that a changed input recomputes them instead of reusing them.

`W/train.lock` holds `{"pid", "host", "start"}` of the run that owns W. It is taken with `flock`
(released by the kernel when the process dies) and the pid/host in it name the holder in the error
a second run gets; a lock left by a killed run (its pid dead on this host) is taken over with a
warning. An empty lock file is a free one.

A URL workdir (gs://) has no flock and its holder may be on a host that is gone (a pod preempted and
recreated has other host names): the holder rewrites its lock's `refreshed` time every
`URL_LOCK_REFRESH_SECONDS` from a thread, and a lock of another host not refreshed for
`URL_LOCK_STALE_SECONDS` is a dead run's, taken over with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterable
from typing import Any

from alignx_jax import paths
from alignx_jax.errors import AlignXError, ConfigError

LOCK_FILE = "train.lock"
URL_LOCK_REFRESH_SECONDS = 60.0
URL_LOCK_STALE_SECONDS = 600.0  # ten missed refreshes: no live holder is that late

# keys a resumed run may change: how long it runs, how it logs and saves, the layout it runs on, and
# memory/speed settings that compute the same numbers. Everything else in model / data / loss / optim /
# pba / train changes what is trained and is refused unless train.allow_config_change.
FREE_KEYS = (
    "workdir",
    "train.steps",
    "train.epochs",
    "train.log_every",
    "train.eval_every",
    "train.progress",
    "train.wandb_project",
    "train.distributed",
    "train.allow_config_change",
    "train.micro_batch",
    "checkpoint.",
    "mesh.",
    "sharding.",
    "plan.",
    "model.remat",
    "model.attention_impl",
    "model.scan_layers",
    "model.cpu_matmul",
    "model.matmul_precision",
    "loss.logps_chunk",
    "loss.logits_on_responses",
    "loss.nan_policy",
    "loss.max_skipped_steps",
    "data.compact_tokens",
    "data.eval",
)


def warn(message: str) -> None:
    print(f"alignx train: warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------- config changes


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a.b': leaf} of a nested dict (lists and tuples are leaves)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}."))
    return {k.rstrip("."): v for k, v in out.items()}


def is_free(key: str, free: Iterable[str] = FREE_KEYS) -> bool:
    return any(key == f or (f.endswith(".") and key.startswith(f)) for f in free)


def changed_keys(old: dict[str, Any], new: dict[str, Any], *, free: Iterable[str] = FREE_KEYS) -> list[str]:
    """Dotted keys whose value differs between two config dicts, minus the free ones. Only keys both name
    are compared: a key added by a newer version is absent from an older run's config.json. An input path
    (`config.PATH_KEYS`) differs when it names another place (`paths.same_place`), not another spelling."""
    from alignx_jax.config import PATH_KEYS

    a, b = flatten(old), flatten(new)
    # an input path as another spelling of the same place (relative, linked, a trailing '/') is no change
    same = {k: paths.same_place(a[k], b[k]) if k in PATH_KEYS else a[k] == b[k] for k in set(a) & set(b)}
    return [k for k in sorted(same) if not same[k] and not is_free(k, free)]


# what `alignx train` writes in W (besides LOCK_FILE and W/.jax_cache): a folder that holds any of these
# but no run's config.json or lock is someone else's, and a run would replace them
RUN_ENTRIES = (
    "config.json",
    "metrics.jsonl",
    "checkpoints",
    "checkpoints.bad",
    "reference",
    "reference.tmp",
    "tensorboard",
    "data",
    "data.fingerprint",
    "wandb_id.txt",
)


def check_run_folder(workdir: str, *, writes_data: bool = True) -> None:
    """ConfigError when W exists, is no earlier run's folder (no lock, no run config.json) and holds
    files a run writes: they are the user's, and a run would replace them. `writes_data`: the run
    writes W/data (synthetic users); else a `data/` there is the user's input. Read only (every process)."""
    w = paths.path(workdir)
    for a in (w, *w.parents):  # by name first: a folder is asked only when named as a run's sub-folder
        if a.name in RUN_FOLDERS and _is_run_folder(a.parent):
            where = f"the {a.name}/ folder" if a == w else f"inside the {a.name}/ folder"
            raise ConfigError(
                f"workdir {workdir}: {where} of the run in {a.parent}, which that run writes and prunes; "
                "choose a new folder"
            )
    if not w.is_dir():
        return
    if _is_run_folder(w):
        return
    names = sorted(p.name for p in w.iterdir())
    ours = RUN_ENTRIES if writes_data else tuple(n for n in RUN_ENTRIES if not n.startswith("data"))
    clash = [n for n in names if n in ours or n.startswith(("ref_logps.", "pba_predicted."))]
    if clash:
        raise ConfigError(
            f"workdir {workdir}: not an alignx run's folder, and holds {paths.listing(clash)}, which a run "
            "writes and replaces; choose a new or empty folder (or a run's own workdir)"
        )


# a run's own sub-folders: another run made in one would mix its files with that run's
RUN_FOLDERS = ("checkpoints", "checkpoints.bad", "reference", "reference.tmp", "tensorboard")


def _is_run_folder(folder: Any) -> bool:
    """`folder` holds a run's lock or its config.json (a run config: a `model` section). Read only."""
    try:
        if (folder / LOCK_FILE).exists():
            return True
        saved = read_saved_config(str(folder))  # None when there is none
    except OSError:
        return False
    return isinstance(saved, dict) and isinstance(saved.get("model"), dict)


def read_saved_config(workdir: str) -> dict[str, Any] | None:
    """W/config.json as a dict, None when absent; unreadable is a warning and None."""
    path = os.path.join(workdir, "config.json")
    if not paths.path(path).exists():
        return None
    try:
        saved = json.loads(paths.path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        warn(f"{path}: unreadable ({e}); the resumed run's config is not compared with it")
        return None
    return saved if isinstance(saved, dict) else None


def check_config_change(workdir: str, current: dict[str, Any], *, allow: bool) -> list[str]:
    """Refuse (ConfigError) a resume whose config changes what is trained; returns the changed keys."""
    saved = read_saved_config(workdir)
    if saved is None:
        return []
    keys = changed_keys(saved, current)
    if not keys:
        return []
    a, b = flatten(saved), flatten(current)
    shown = ", ".join(f"{k} ({a[k]!r} -> {b[k]!r})" for k in keys[:6])
    more = f" and {len(keys) - 6} more" if len(keys) > 6 else ""
    if not allow:
        raise ConfigError(
            f"{workdir}/config.json: resuming with a different config: {shown}{more}; rerun with "
            "the saved settings, use a fresh workdir, or pass --config.train.allow_config_change=true"
        )
    warn(f"resuming with a changed config (train.allow_config_change): {shown}{more}")
    return keys


# the settings of the synthetic users a run with no data.train writes into W/data
SYNTH_KEYS = ("data.synth_users", "data.synth_pairs_per_user", "data.synth_seed")


def check_synth_kept(workdir: str, current: dict[str, Any]) -> None:
    """Refuse (ConfigError) a resume on synthetic users (no data.train, now and before) whose settings
    changed, even with train.allow_config_change: W/data, which its checkpoints trained on, would be
    rewritten, and the resume would fail on the new rows."""
    saved = read_saved_config(workdir)
    if saved is None:
        return
    a, b = flatten(saved), flatten(current)
    if a.get("data.train") or b.get("data.train"):
        return
    keys = [k for k in SYNTH_KEYS if k in a and k in b and a[k] != b[k]]
    if keys:
        shown = ", ".join(f"{k} ({a[k]!r} -> {b[k]!r})" for k in keys)
        raise ConfigError(
            f"{workdir}/config.json: resuming on other synthetic data: {shown}; its checkpoints trained on "
            f"{workdir}/data (train.allow_config_change keeps the data); rerun with the saved data.synth_* "
            "settings or use a fresh workdir"
        )


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON through a temporary file and a rename: a reader never sees half a file (a URL: one
    object write, which is atomic on gs://)."""
    text = (obj if isinstance(obj, str) else json.dumps(obj, indent=2, sort_keys=True)) + "\n"
    paths.write_all({path: text.encode("utf-8")})


# ----------------------------------------------------------------------------- fingerprints


def path_signature(path: str) -> list[list[Any]]:
    """[relative name, size, mtime_ns] of a file or of every file under a folder (sorted): cheap to get
    and changed by any rewrite, without reading the data."""
    if not path:
        return []
    if paths.is_url(path):
        return _url_signature(str(path).rstrip("/"))
    if os.path.isfile(path):
        st = os.stat(path)
        return [[os.path.basename(path), st.st_size, st.st_mtime_ns]]
    out = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            st = os.stat(full)
            out.append([os.path.relpath(full, path), st.st_size, st.st_mtime_ns])
    return out


def _url_signature(url: str) -> list[list[Any]]:
    """`path_signature` of a URL (gs://...): [relative name, length, mtime] from the bucket's metadata."""
    top = paths.path(url)
    if not top.exists():
        return []
    if not top.is_dir():
        st = top.stat()
        return [[top.name, st.length, st.mtime]]
    out = []
    for sub, child in paths.files_below(top):
        st = child.stat()
        out.append([sub, st.length, st.mtime])
    return sorted(out)


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


def fingerprint_matches(path: str, want: str) -> bool:
    """Whether derived file `path` exists and its sidecar `path.fingerprint` says `want`."""
    try:
        with paths.path(path + ".fingerprint").open("r") as f:
            return paths.path(path).exists() and f.read().strip() == want
    except OSError:
        return False


def forget_fingerprint(path: str) -> None:
    """Drop the sidecar before rewriting `path`: a rewrite cut half-way is then never taken as current."""
    try:
        paths.path(path + ".fingerprint").unlink()
    except FileNotFoundError:
        pass


def write_fingerprint(path: str, value: str) -> None:
    paths.write_all({path + ".fingerprint": (value + "\n").encode("utf-8")})


def save_array(path: str, array: Any) -> None:
    """`np.save` of a derived array: through a temporary file and a rename (a URL: saved in memory and
    uploaded as one object write, atomic on gs://; np.save and os.replace cannot open a URL)."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array)
    paths.write_all({path: buf.getvalue()})


def save_derived(path: str, array: Any, key: str) -> None:
    """A derived array and its fingerprint `key`: the old fingerprint goes first, so a kill mid-write
    leaves an array no fingerprint vouches for (recomputed), never a stale one that matches."""
    forget_fingerprint(path)
    save_array(path, array)
    write_fingerprint(path, key)


def load_array(path: str) -> Any:
    """The array `save_array` wrote (a URL: downloaded whole)."""
    import io

    import numpy as np

    if paths.is_url(path):
        return np.load(io.BytesIO(paths.path(path).read_bytes()))
    return np.load(path)


def array_shape(path: str) -> tuple[int, ...]:
    """The shape of a saved array without reading its data (a URL: only the .npy header)."""
    import numpy as np

    if not paths.is_url(path):
        return np.load(path, mmap_mode="r").shape
    fmt = np.lib.format
    with paths.path(path).open("rb") as f:
        version = fmt.read_magic(f)
        header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        return header(f)[0]


# ----------------------------------------------------------------------------- the lock


# the `NAME.tmp<pid>` names earlier versions wrote aside in W: a killed run's are still removed
_OLD_TMP_ENTRY = re.compile(r"(data|config\.json|.+\.fingerprint)\.tmp(?P<pid>\d+)")


def remove_dead_tmp(folder: str) -> None:
    """Remove what a killed process left half-written in the local W, whose lock the caller holds: every
    `paths.tmp_path` entry of a process gone from this host (`paths.remove_dead_tmp`; another host's or a
    live process's, e.g. an `alignx eval --out` into W beside the run, is kept), and the older names."""
    paths.remove_dead_tmp(folder)
    for name in sorted(os.listdir(folder)):
        m = _OLD_TMP_ENTRY.fullmatch(name)
        if m is None or int(m.group("pid")) == os.getpid() or _alive(int(m.group("pid")), None):
            continue
        paths.remove_left_entry(os.path.join(folder, name))


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot) on Linux, None where /proc has no answer."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    if not paths.pid_alive(pid):
        return False
    now = _start_time(pid)
    return start is None or now is None or now == start  # a different start time: the pid was reused


class WorkdirLock:
    """One `alignx train` per workdir (see the module docstring)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self._fd: int | None = None

    def _holder(self, fd: int) -> dict[str, Any]:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096).decode("utf-8", "replace").strip()
        try:
            held = json.loads(raw) if raw else {}
        except ValueError:
            held = {}
        return held if isinstance(held, dict) else {}

    def _busy(self, held: dict[str, Any]) -> AlignXError:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held["time"])) if "time" in held else "?"
        stale = (
            f"; a lock on a bucket not refreshed for {URL_LOCK_STALE_SECONDS / 60:.0f} minutes is taken over"
            if paths.is_url(self.path)
            else ""
        )
        return AlignXError(
            f"{os.path.dirname(self.path)} is in use by alignx train pid {held.get('pid', '?')} on "
            f"host {held.get('host', '?')} (since {since}); wait for it or stop it (if that run is "
            f"gone, delete {self.path}{stale})"
        )

    def acquire(self) -> None:
        if paths.is_url(self.path):
            self._acquire_url()
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                paths.try_flock(fd)  # False, no flock on this file system: the recorded holder alone decides
            except paths.LockHeld:
                raise self._busy(self._holder(fd)) from None
            held = self._holder(fd)
            host = socket.gethostname()
            if held.get("pid") is not None and held.get("pid") != os.getpid():
                if held.get("host") != host or _alive(int(held["pid"]), held.get("start")):
                    # no flock across hosts / on some network file systems: the recorded holder decides
                    raise self._busy(held)
                warn(
                    f"{self.path}: taking over the lock of pid {held['pid']} on {host}, which is gone "
                    "(a killed run)"
                )
            me = {"pid": os.getpid(), "host": host, "start": _start_time(os.getpid()), "time": time.time()}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(me) + "\n").encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _acquire_url(self) -> None:
        """A URL workdir has no flock: the recorded holder alone decides (as on a file system without it)."""
        p = paths.path(self.path)
        try:
            held = json.loads(p.read_text(encoding="utf-8") or "{}") if p.exists() else {}
        except ValueError:
            held = {}
        host = socket.gethostname()
        if isinstance(held, dict) and held.get("pid") is not None and held.get("pid") != os.getpid():
            age = time.time() - float(held.get("refreshed", held.get("time", 0)) or 0)
            if held.get("host") == host:
                if _alive(int(held["pid"]), held.get("start")):
                    raise self._busy(held)
                warn(f"{self.path}: taking over the lock of pid {held['pid']} on {host}, which is gone")
            elif age < URL_LOCK_STALE_SECONDS:
                raise self._busy(held)
            else:
                warn(
                    f"{self.path}: taking over the lock of pid {held['pid']} on host {held.get('host')}, "
                    f"not refreshed for {age:.0f} s (its run is gone)"
                )
        now = time.time()
        self._me = {
            "pid": os.getpid(),
            "host": host,
            "start": _start_time(os.getpid()),
            "time": now,
            "refreshed": now,
        }
        p.write_text(json.dumps(self._me) + "\n", encoding="utf-8")
        self._url_held = True
        import threading

        self._stop_refresh = threading.Event()
        self._refresher = threading.Thread(target=self._refresh_loop, name="alignx-lock-refresh", daemon=True)
        self._refresher.start()

    def _refresh_loop(self) -> None:
        """The URL lock's heartbeat (module docstring); a failed write is retried at the next beat."""
        while not self._stop_refresh.wait(URL_LOCK_REFRESH_SECONDS):
            self.refresh()

    def refresh(self) -> None:
        """Rewrite the held URL lock with the time now."""
        if getattr(self, "_url_held", False):
            try:
                self._me["refreshed"] = time.time()
                paths.path(self.path).write_text(json.dumps(self._me) + "\n", encoding="utf-8")
            except Exception:  # a bucket's hiccup: the next beat writes it; ten in a row make it stale
                pass

    def release(self) -> None:
        if getattr(self, "_url_held", False):
            self._url_held = False
            self._stop_refresh.set()
            self._refresher.join(timeout=30)
            try:
                paths.path(self.path).write_text("", encoding="utf-8")  # empty = free
            except OSError:
                pass
            return
        if self._fd is None:
            return
        import fcntl

        try:
            os.ftruncate(self._fd, 0)  # empty = free: the next run takes it without a warning
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        except OSError:  # closing the file releases the flock anyway
            pass
        finally:
            os.close(self._fd)
            self._fd = None
