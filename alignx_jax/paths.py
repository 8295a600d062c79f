"""Paths that may be URLs (gs://bucket/run, s3://...): every file the CLI reads or writes outside the
trainer's array I/O goes through `etils.epath`, and nothing turns a URL into a local path.

`os.path.abspath("gs://b/w")` is `<cwd>/gs:/b/w`: a silent local folder. `absolute()` keeps URLs as
they are and makes local paths absolute; `path()` is the `epath.Path` to open/list/rename them.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from etils import epath


def is_url(p: Any) -> bool:
    return "://" in os.fspath(p)


def absolute(p: Any) -> str:
    """`p` as an absolute local path, or the URL unchanged."""
    s = os.fspath(p)
    return s if is_url(s) else os.path.abspath(s)


# the URL schemes etils.epath opens (through fsspec: gcsfs for gs://, s3fs for s3://)
SCHEMES = ("gs", "s3", "az", "abfs")


def path(p: Any) -> epath.Path:
    """An `epath.Path` (local or remote); the string of a URL round-trips unchanged."""
    s = absolute(p)
    if is_url(s) and s.split("://", 1)[0] not in SCHEMES:  # epath's own error is a KeyError traceback
        # an OSError naming the path: `alignx` prints it as one line (errors.py sits above this module)
        raise OSError(errno.EINVAL, f"not a local path nor a {'/'.join(f'{x}://' for x in SCHEMES)} URL", s)
    return epath.Path(s)


def is_main_process() -> bool:
    """Process 0 of a multi-process job (one process: always). Imports jax only if it is loaded."""
    import sys

    jax = sys.modules.get("jax")
    return jax is None or jax.process_index() == 0


def process_count() -> int:
    import sys

    jax = sys.modules.get("jax")
    return 1 if jax is None else int(jax.process_count())


def is_dir(p: Any) -> bool:
    """A folder, local (os) or at a URL (epath)."""
    return path(p).is_dir() if is_url(p) else os.path.isdir(p)


def is_file(p: Any) -> bool:
    return path(p).is_file() if is_url(p) else os.path.isfile(p)


def exists(p: Any) -> bool:
    return path(p).exists() if is_url(p) else os.path.exists(p)


class LockHeld(Exception):
    """`try_flock`: another open file description holds the flock (its caller says whose, in its words)."""


def try_flock(fd: int) -> bool:
    """Take `fd`'s exclusive flock without waiting (released when `fd` closes, or by the kernel when the
    process dies): True when taken, False where the file system has no flock (ENOLCK, EOPNOTSUPP); another
    holder: `LockHeld`."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise LockHeld(e) from None
        return False
    return True


def listing(names: list[str], shown: int = 4) -> str:
    """The first `shown` of a folder's `names` for a one-line error ("a, b, c, d and 3 more")."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def files_below(top: epath.Path) -> Iterator[tuple[str, epath.Path]]:
    """Every file under the folder `top` (local or a URL), at any depth, as (path relative to top, path)."""
    todo = [(top, "")]
    while todo:
        folder, rel = todo.pop()
        for child in folder.iterdir():
            sub = f"{rel}/{child.name}" if rel else child.name
            if child.is_dir():
                todo.append((child, sub))
            else:
                yield sub, child


def check_writable(dest: str) -> None:
    """OSError now when the file `dest` could not be written later (a folder there, or its folder cannot be
    made or written). A URL: a small object beside it is written and deleted (a read-only bucket refuses
    it now, not after the work that ends in the write)."""
    if is_url(dest):
        out = path(dest)
        probe = out.parent / f".{out.name}.probe-{os.getpid()}"
        try:
            if out.is_dir():  # the write would fail there, after the work
                raise IsADirectoryError(errno.EISDIR, "a folder, not a file", dest)
            out.parent.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
        except OSError:
            raise
        # a client's own error (gcsfs HttpError, missing credentials) as the OSError callers catch
        except Exception as e:
            raise OSError(errno.EACCES, f"{type(e).__name__}: {e}", dest) from None
        try:
            probe.unlink()
        except OSError:  # allowed to create objects but not to delete them: `dest` can still be written
            pass
        return
    if os.path.isdir(dest):  # the write's rename would fail there, after the work
        raise IsADirectoryError(errno.EISDIR, "a folder, not a file", dest)
    # probed in the nearest folder that exists, none made: a command refused later leaves no empty
    # folders behind (the write makes them)
    folder = os.path.dirname(os.path.abspath(dest))
    while not os.path.lexists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise NotADirectoryError(errno.ENOTDIR, "a file where a folder would go", folder)
    probe = os.path.join(folder, f".{os.path.basename(dest)}.probe-{os.getpid()}")
    with open(probe, "wb"):
        pass
    os.remove(probe)


# `tmp_path`'s names: `.NAME.tmp-HOST-PID` (HOST may hold '-'; PID is the digits after the last one)
_TMP_ENTRY = re.compile(r"\.(?P<name>.+)\.tmp-(?P<host>.+)-(?P<pid>\d+)")


def tmp_path(dest: Any) -> str:
    """This process's temporary name beside the local file or folder `dest`, which it writes and then renames
    onto `dest`: `.NAME.tmp-HOST-PID`, the one pattern `remove_dead_tmp` matches. What a killed writer left
    there for the same `dest` is removed first: a retry does not pile them up."""
    folder, name = os.path.split(os.fspath(dest))
    remove_dead_tmp(folder or ".", re.compile(re.escape(name)))
    return os.path.join(folder, f".{name}.tmp-{socket.gethostname()}-{os.getpid()}")


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` runs on this host (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def remove_dead_tmp(folder: str, names: re.Pattern[str] | None = None) -> None:
    """Remove the `tmp_path` entries in the local `folder` (of a file whose name `names` matches, all when
    None) that a killed process left: its HOST is this one and its PID runs no more. Another host's (a
    shared file system) or a live process's is kept, whoever holds the folder's lock."""
    try:
        entries = sorted(os.listdir(folder))
    except OSError:  # no folder yet: nothing left in it
        return
    host = socket.gethostname()
    for entry in entries:
        m = _TMP_ENTRY.fullmatch(entry)
        if (
            m is None
            or m.group("host") != host
            or (names is not None and not names.fullmatch(m.group("name")))
        ):
            continue
        pid = int(m.group("pid"))
        if pid == os.getpid() or pid_alive(pid):
            continue
        remove_left_entry(os.path.join(folder, entry))


def remove_left_entry(path: str) -> None:
    """Remove a file, link or folder a killed writer left, as far as this user may."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except OSError:  # gone already, or another user's in a shared folder: left, as a folder is
            pass


def write_all(files: dict[str, bytes]) -> None:
    """Write every `dest: data` of one output: all under temporary names first, then each renamed into
    place, so a kill leaves either none of the outputs or all of them (a URL is written in place)."""
    staged = []
    try:
        for dest, data in files.items():
            out = path(dest)
            out.parent.mkdir(parents=True, exist_ok=True)
            if is_url(dest):
                out.write_bytes(data)
                continue
            tmp = tmp_path(out)
            staged.append((tmp, os.fspath(out)))
            with open(tmp, "wb") as f:
                f.write(data)
        for _, dest in staged:  # the one way a rename below could fail part-way
            if os.path.isdir(dest):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), dest)
        for tmp, dest in staged:
            os.replace(tmp, dest)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.remove(tmp)


def read_json(p: str) -> Any:
    """The local file `p` as one JSON value; None when it cannot be read or is not JSON."""
    try:
        with open(p, "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def first_json_line(p: str) -> Any:
    """The first non-blank line of the local JSONL file `p` as JSON; None when there is none, the file
    cannot be read or the line is not JSON (a file of another kind: notes, a JSON list)."""
    try:
        with open(p, "rb") as f:
            for line in f:
                if line.strip():
                    return json.loads(line)
    except (OSError, ValueError):
        return None
    return None


def place(p: str) -> str:
    """`p` as a place to compare with another, by name (nothing is listed): a local path's real path, a URL
    as written less a trailing '/'."""
    return p.rstrip("/") if is_url(p) else os.path.realpath(p)


def same_place(a: Any, b: Any) -> bool:
    """Whether two recorded inputs name one place (`place`: a relative, linked or trailing-'/' spelling of
    it is the same input, another file is not); a URL and a local path never meet, a dict (`{"scores":
    FILE}`) compares key by key, anything else (None, a number) as it is."""
    if isinstance(a, str) and isinstance(b, str) and a and b:
        return a == b or (is_url(a) == is_url(b) and place(a) == place(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_place(a[k], b[k]) for k in a)
    return a == b


def within(p: str, folder: str) -> bool:
    """Whether `p` is the place `folder` or lies inside it (`place`; a URL and a local path never meet)."""
    if is_url(p) != is_url(folder):
        return False
    sep = "/" if is_url(folder) else os.sep
    return place(p) == place(folder) or place(p).startswith(place(folder).rstrip(sep) + sep)


def refuse_inside_inputs(flag: str, dest: str, inputs: Iterable[tuple[str, str | None]]) -> str | None:
    """Why the output `dest` (given as `flag`) must not be written, as one line, when it is one of the
    `inputs` (`(what, path)` pairs) or lies inside an input folder (a --benchmark or --data folder: the
    next read of it would take the file for data); None when neither. By name (`place`, `within`)."""
    for what, p in inputs:
        if p and is_url(p) == is_url(dest) and place(p) == place(dest):
            return f"{flag} {dest} is the {what} file; give another {flag}"
        if p and within(dest, p):
            return f"{flag} {dest} lies inside the {what} folder {p}; give another {flag}"
    return None


def refuse_unwritable(flag: str, dest: str, *, folder: bool) -> str | None:
    """Why the output `dest` (given as `flag`), a folder if `folder` else a file, could not be written, as
    one line naming the flag; None when it could. Checked before the work, as `check_writable` does (a
    URL is left to the write: its probe would create an object)."""
    what = "folder" if folder else "file"
    if not dest:  # not the working directory in its place
        return f"{flag}: an empty path; name a {what}"
    if is_url(dest):
        return None
    if folder and os.path.lexists(dest) and not os.path.isdir(dest):
        return f"{flag} {dest}: is a file, not a folder"
    if not folder and os.path.isdir(dest):
        return f"{flag} {dest}: is a folder, not a file"
    try:
        check_writable(os.path.join(dest, ".probe") if folder else dest)
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        return f"{flag} {dest}: cannot be written ({e.strerror or e}{where})"
    return None


def refuse_to_replace(
    flag: str,
    dest: str,
    inputs: Iterable[tuple[str, str | None]],
    is_own: Callable[[str], bool],
    own: str,
) -> str | None:
    """Why a command must not write its output `dest` (given as `flag`), as one line; None when it may.

    An output replaces an earlier output of the same command only: never one of the command's
    `inputs` (`(what, path)` pairs: a data file, a model's config.json), which it would overwrite with
    no way back, and never another existing file (notes, a data set), which `is_own(dest)` tells from
    the command's own output by its content; `own` names that output in the line. A URL `dest` is compared
    with the URL inputs as written (as `data split` compares them); a bucket object's content is not read.
    Nor is `dest` inside an input folder (`refuse_inside_inputs`)."""
    url = is_url(dest)
    problem = refuse_inside_inputs(flag, dest, inputs)
    if problem:
        return problem
    if url:
        return None
    if os.path.isfile(dest) and not is_own(dest):
        return f"{flag} {dest} exists and is not {own}; give a new file (or remove it)"
    return None
