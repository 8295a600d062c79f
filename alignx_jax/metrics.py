"""Training metrics: one JSON object per logged step in `W/metrics.jsonl`, scalars in TensorBoard.

Only process 0 writes (every host computes the same replicated scalars). The JSONL file is opened
in append mode and flushed per line, so a resumed run continues the same file and a reader (a test,
`tail -f`) sees each step as soon as it is logged.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any


def _plain(v: Any) -> Any:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    if isinstance(v, (bool, int)) and not isinstance(v, float):
        return v
    return f if math.isfinite(f) else str(f)  # JSON has no NaN/inf literal


class MetricsWriter:
    """`write(step, metrics)` appends to W/metrics.jsonl and logs scalars under W/tensorboard."""

    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None):
        """`resume_step`: drop records after that step (a run killed after its last checkpoint logged
        steps that the resumed run will log again)."""
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        if resume_step is not None and os.path.exists(path):
            keep = [r for r in read_metrics(workdir) if int(r.get("step", 0)) <= resume_step]
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in keep)
            os.replace(path + ".tmp", path)
        self._file = open(path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # tensorboardX is a dependency; a stripped install still logs JSONL
                self._tb = None

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"train/{k}", v, int(step))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All records of W/metrics.jsonl (for tests, the demo and reports)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
