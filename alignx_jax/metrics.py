"""Training metrics: one JSON object per logged step in `W/metrics.jsonl`, scalars in TensorBoard.

Only process 0 writes (every host computes the same replicated scalars). The JSONL file is opened
in append mode and each record is one write of one whole line, flushed, so a resumed run continues
the same file, a reader (a test, `tail -f`) sees each step as soon as it is logged, and a kill or a
full disk can only cut the last line. `read_jsonl` drops such a line with a warning.

A URL workdir (gs://...) goes through etils.epath: an object cannot be appended to, so the file is
rewritten whole, at most every `URL_REWRITE_SECONDS` (rewriting it at each step uploads O(steps^2) bytes and
passes Cloud Storage's one write a second to one object), at each checkpoint save (`flush`; the trainer
calls it, so nothing logged up to a checkpoint is lost to a kill) and at `close` (and TensorBoard events
go to the URL only if tensorboardX can).

Train metric names are TRL's (`DPOTrainer`): `loss`, `grad_norm`, `learning_rate`, `rewards/chosen`,
`rewards/rejected`, `rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected`,
`logits/chosen`, `logits/rejected`; TensorBoard tags are `train/<name>`. A non-finite value (a step skipped
under loss.nan_policy=skip) is the string "nan" (or "inf") in the JSONL, a NaN (inf) scalar in TensorBoard.
`wandb_project` also logs every scalar to Weights & Biases under the same `train/<name>` (wandb reads
WANDB_MODE=offline etc.), as one W&B run per workdir (its id in W/wandb_id.txt; a resumed run continues it).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
import resource
import sys
import time
from typing import Any

from alignx_jax import paths
from alignx_jax.errors import ConfigError


def host_usage() -> resource.struct_rusage:
    """This process's resource usage now: the start of a `host_costs` interval."""
    return resource.getrusage(resource.RUSAGE_SELF)


def host_costs(since: resource.struct_rusage) -> dict[str, float]:
    """This process's minor page faults and kernel CPU seconds since `since` (`host_usage()`): memory a
    runtime frees and faults in again every step costs kernel time on some CPU VMs (BENCHMARKS.md §9)."""
    now = host_usage()
    return {
        "page_faults": float(now.ru_minflt - since.ru_minflt),
        "kernel_seconds": now.ru_stime - since.ru_stime,
    }


def _plain(v: Any) -> Any:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    if isinstance(v, (bool, int)) and not isinstance(v, float):
        return v
    return f if math.isfinite(f) else str(f)  # JSON has no NaN/inf literal


def _nonfinite(v: Any) -> bool:
    """A number `_plain` logs as a string ("nan", "inf"): a float or a one-element array, not a bool."""
    if isinstance(v, (bool, str)):
        return False
    try:
        return not math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


URL_REWRITE_SECONDS = 30.0
PIPE_PROGRESS_SECONDS = 30.0  # a progress bar's refresh period when stderr is a file or a pipe


def progress_bar(iterable: Any = None, **kwargs: Any) -> Any:
    """A tqdm bar (`tqdm.auto`'s, on stderr unless `file=` says otherwise). On a terminal it redraws up to
    10 times a second; on a file or a pipe (a job's log) at most every `PIPE_PROGRESS_SECONDS`: each redraw
    there is one more carriage-return line in the log, tens of thousands of them over a long run."""
    from tqdm.auto import tqdm

    stream = kwargs.setdefault("file", sys.stderr)
    try:
        tty = bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        tty = False
    kwargs.setdefault("dynamic_ncols", tty)
    if not tty and not tqdm.__module__.startswith("tqdm.notebook"):  # a notebook widget is not a log
        kwargs.setdefault("mininterval", PIPE_PROGRESS_SECONDS)
        kwargs.setdefault("maxinterval", PIPE_PROGRESS_SECONDS)
    return tqdm(iterable, **kwargs)


class MetricsWriter:
    """`write(step, metrics)` appends to W/metrics.jsonl and logs scalars under W/tensorboard."""

    def __init__(
        self,
        workdir: str,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        resume_step: int | None = None,
        wandb_project: str = "",
        wandb_config: dict[str, Any] | None = None,
        url_rewrite_seconds: float = URL_REWRITE_SECONDS,
    ):
        """`resume_step`: drop records after that step (a run killed after its last checkpoint logged
        steps that the resumed run will log again). `wandb_project` ('' = off): also log to W&B (a
        ConfigError when wandb is not installed); `wandb_config` is the run config it records.
        `url_rewrite_seconds`: a URL workdir's file is rewritten at most this often (and at `flush`)."""
        self.enabled = enabled
        self._file = None
        self._tb = None
        self._wandb = None
        self._url_records: list[dict[str, Any]] | None = None  # a URL workdir: every record, rewritten
        self._url_every = float(url_rewrite_seconds)
        self._url_dirty = False  # records not yet in the bucket
        self._url_written = 0.0
        if not enabled:
            return
        if wandb_project:  # first: a missing package fails before any file is touched
            self._wandb = _wandb_run(wandb_project, workdir, wandb_config)
        if paths.is_url(workdir):
            self._url_path = paths.path(workdir) / "metrics.jsonl"
            self._url_path.parent.mkdir(parents=True, exist_ok=True)
            self._url_records = [
                r for r in read_metrics(workdir) if resume_step is None or _step_of(r) <= resume_step
            ]
            self._rewrite_url()
        else:
            self._open_local(workdir, resume_step)
        if tensorboard:
            self._tb = _tensorboard_writer(os.path.join(workdir, "tensorboard"), resume_step)

    def _rewrite_url(self) -> None:
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self._url_records or [])
        self._url_path.write_text(text, encoding="utf-8")
        self._url_dirty, self._url_written = False, time.monotonic()

    def flush(self) -> None:
        """Put every record logged so far in W/metrics.jsonl (a local file has them already) and every
        TensorBoard event in its file: the trainer calls it at each checkpoint save, which a resume cuts
        both back to."""
        if self._url_records is not None and self._url_dirty:
            self._rewrite_url()
        if self._tb is not None:
            self._tb.flush()

    def _open_local(self, workdir: str, resume_step: int | None) -> None:
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        if resume_step is not None and os.path.exists(path):
            keep = [r for r in read_metrics(workdir) if _step_of(r) <= resume_step]
            paths.write_all(
                {path: "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep).encode("utf-8")}
            )
        elif os.path.exists(path) and os.path.getsize(path):
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                cut = f.read(1) != b"\n"
            if cut:  # end the cut line, so the next record is not glued to it
                with open(path, "a", encoding="utf-8") as f:
                    f.write("\n")
        self._file = open(path, "a", encoding="utf-8")

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        if self._url_records is not None:
            self._url_records.append(record)
            self._url_dirty = True
            if time.monotonic() - self._url_written >= self._url_every:
                self._rewrite_url()
        else:
            self._write_local(record)
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"train/{k}", v, int(step))
                elif _nonfinite(metrics.get(k)):  # a skipped step's "nan": TensorBoard plots a NaN scalar
                    self._tb.add_scalar(f"train/{k}", float(metrics[k]), int(step))
        if self._wandb is not None:
            scalars = {
                f"train/{k}": v
                for k, v in record.items()
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            self._wandb.log(scalars, step=int(step))

    def _write_local(self, record: dict[str, Any]) -> None:
        try:
            self._file.write(json.dumps(record, sort_keys=True) + "\n")  # one write of the whole line
            self._file.flush()
        except OSError as e:  # a full disk: name the file (a failed write() carries no file name)
            raise OSError(e.errno, e.strerror, e.filename or self._file.name) from None

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


# the URL schemes tensorboardX writes, and the client each needs (module, what to install); any other
# scheme it takes for a local folder (`az://b/w` becomes ./az:/b/w)
_TB_URL_CLIENTS = {
    "gs": ("google.cloud.storage", "google-cloud-storage: pip install -e '.[gcs]'"),
    "s3": ("boto3", "boto3: pip install boto3"),
}
_TB_WARNED: set[str] = set()  # one warning per URL per process, not one per MetricsWriter


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package; a stand-in without a spec
        return False


def url_tensorboard_problem(logdir: str) -> str | None:
    """Why tensorboardX cannot write events to the URL `logdir` (None: it may). Asked before the writer is
    made: without its client tensorboardX raises an ImportError, and its half-made GCS writer then prints
    a traceback from __del__."""
    scheme = logdir.split("://", 1)[0]
    if scheme not in _TB_URL_CLIENTS:
        return f"tensorboardX writes only {' and '.join(f'{x}://' for x in _TB_URL_CLIENTS)} URLs"
    module, install = _TB_URL_CLIENTS[scheme]
    return None if _importable(module) else f"tensorboardX needs {install}"


def _tensorboard_writer(logdir: str, resume_step: int | None) -> Any:
    """An event file in `logdir` (`_EventsFile`), or None (a warning line when a URL cannot take events)."""
    why = url_tensorboard_problem(logdir) if paths.is_url(logdir) else None
    if why is not None:
        if logdir not in _TB_WARNED:
            _TB_WARNED.add(logdir)
            print(
                f"alignx: warning: no TensorBoard events in {logdir} ({why}); metrics.jsonl has every step",
                file=sys.stderr,
            )
        return None
    try:
        return _EventsFile(logdir, None if resume_step is None else int(resume_step) + 1)
    except ImportError:  # tensorboardX is a dependency; a stripped install still logs JSONL
        return None
    except Exception as e:  # a URL tensorboardX cannot write: the JSONL file still has everything
        print(
            f"alignx: warning: no TensorBoard events in {logdir} ({' '.join(str(e).split())})",
            file=sys.stderr,
        )
        return None


TB_FLUSH_SECONDS = 120.0  # tensorboardX's own default: how stale a live TensorBoard may be
_EVENT_FILES = itertools.count()  # a second writer of this process in the same second gets its own file


class _EventsFile:
    """One TensorBoard event file, each scalar written as it is logged and the file flushed at `flush`.

    tensorboardX's SummaryWriter hands events to a thread through a queue that its flush() does not wait
    for, so events logged before a checkpoint could be lost to a kill after it (the resumed run does not
    log them again); and its file name carries only the second and the host, so a second writer in the
    same second truncated the first one's file."""

    def __init__(self, logdir: str, purge_step: int | None):
        events_writer, event_pb2, summary = _tensorboard_modules()
        self._event_pb2, self._summary = event_pb2, summary
        if not paths.is_url(logdir):
            os.makedirs(logdir, exist_ok=True)
        suffix = f".{os.getpid()}.{next(_EVENT_FILES)}"
        self._writer = events_writer(logdir.rstrip("/") + "/events", suffix)
        self._flushed = time.monotonic()
        if purge_step is not None:
            # a resume hides the events of steps after its checkpoint (a killed run logged them; this one logs
            # them again): TensorBoard purges every step from a START marker's step on
            start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self._writer.write_event(
                event_pb2.Event(wall_time=time.time(), step=purge_step, session_log=start)
            )
            self.flush()

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        summary = self._summary.scalar(tag, float(value))
        self._writer.write_event(
            self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary)
        )
        if time.monotonic() - self._flushed >= TB_FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        self._writer.flush()
        self._flushed = time.monotonic()

    def close(self) -> None:
        self._writer.close()


def _tensorboard_modules():
    """tensorboardX's EventsWriter, event protos and summary module, imported without torch: it imports torch
    only to accept torch tensors (~3 s of every start-up); we log floats."""
    if "torch" in sys.modules:
        return _import_tensorboard_modules()
    sys.modules["torch"] = None  # `import torch` raises ImportError while tensorboardX loads
    try:
        return _import_tensorboard_modules()
    finally:
        del sys.modules["torch"]


def _import_tensorboard_modules():
    from tensorboardX import summary
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto import event_pb2

    return EventsWriter, event_pb2, summary


def has_wandb() -> bool:
    """Whether `import wandb` can work (the config check asks before anything is written)."""
    try:
        return importlib.util.find_spec("wandb") is not None
    except ValueError:  # imported already, without a spec (a test's stand-in)
        return True


def wandb_missing(project: str) -> str:
    return (
        f"train.wandb_project={project!r} needs the wandb package: pip install wandb "
        "(or set train.wandb_project='' to log to metrics.jsonl and TensorBoard only)"
    )


def _wandb_run(project: str, workdir: str, config: dict[str, Any] | None) -> Any:
    """A started W&B run (`wandb.init`) in `project`; ConfigError when wandb is not importable."""
    try:
        import wandb
    except ImportError:
        raise ConfigError(wandb_missing(project)) from None
    local = None if paths.is_url(workdir) else workdir
    if local is not None:
        os.makedirs(local, exist_ok=True)
    return wandb.init(
        project=project,
        name=os.path.basename(str(workdir).rstrip("/")) or None,
        dir=local,
        config=config or {},
        id=wandb_run_id(workdir),
        resume="allow",  # a resumed `alignx train` continues the same W&B run
    )


WANDB_ID_FILE = "wandb_id.txt"


def wandb_run_id(workdir: str) -> str:
    """The workdir's W&B run id: read from W/wandb_id.txt, written there (a new random id) the first
    time, so every (re)start of a run in W logs to one W&B run."""
    import secrets

    path = paths.path(workdir) / WANDB_ID_FILE
    try:
        run_id = path.read_text(encoding="utf-8").strip()
    except (OSError, FileNotFoundError):
        run_id = ""
    if not run_id:
        run_id = secrets.token_hex(8)  # W&B ids: letters and digits
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n", encoding="utf-8")
    return run_id


def _step_of(record: dict[str, Any]) -> float:
    try:
        return int(record.get("step", 0))
    except (TypeError, ValueError):
        return math.inf


def read_jsonl(path: str, *, warn: bool = True) -> list[dict[str, Any]]:
    """The JSON objects of an append-only JSONL file. A line that does not parse (cut by a kill or a
    full disk mid-write) is dropped, with one warning line on stderr naming the file and the line."""
    p = paths.path(path)
    if not p.exists():
        return []
    with p.open("rb") as f:
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    out, bad = [], []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if isinstance(rec, dict):
            out.append(rec)
        else:
            bad.append(lineno)
    if bad and warn:
        what = (
            "the last line is cut"
            if bad == [len(lines)]
            else f"lines {', '.join(map(str, bad[:5]))} are not JSON"
        )
        print(
            f"alignx: warning: {path}: {what} (an interrupted write); dropped {len(bad)} line(s)",
            file=sys.stderr,
        )
    return out


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All records of W/metrics.jsonl (for tests, the demo and reports); see `read_jsonl`."""
    return read_jsonl(os.path.join(workdir, "metrics.jsonl"))
