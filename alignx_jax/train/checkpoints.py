"""The run's checkpoints: what is saved with a step (`meta_for`), saving (`save`), resuming from the
newest step that verifies (`restore`), and the error of a non-finite step, which names that step.

`TrainerCheckpoints` holds them as methods of `train.loop.Trainer` (its base: they read and set the
Trainer's attributes); the checkpointer itself (checksums, finiteness) is `alignx_jax.checkpointing`.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import jax
import numpy as np

from alignx_jax import workdir as workdir_lib
from alignx_jax.batch import agree_max
from alignx_jax.checkpointing import TrainCheckpointer, abstract_like
from alignx_jax.data import sources
from alignx_jax.errors import AlignXError, ConfigError
from alignx_jax.train.setup import write_run_config
from alignx_jax.train.step import describe_nonfinite


class TrainerCheckpoints:
    """The checkpoint phases of `Trainer` (a base of it): resume, the saved meta, saving."""

    def restore(self) -> None:
        """Open the checkpoints and resume from the newest that verifies, if any."""
        cfg = self.cfg
        self.ckpt = TrainCheckpointer(
            os.path.join(self.workdir, "checkpoints"),
            keep=int(cfg.checkpoint.keep),
            async_save=bool(cfg.checkpoint["async"]),
        )
        # restore targets (shapes, dtypes, shardings); also what a failed run checks its last checkpoint with
        params, opt_state = self.params, self.opt_state
        self.targets = (
            (abstract_like(params["policy"]), abstract_like(opt_state), abstract_like(params["head"]))
            if self.joint
            else (abstract_like(params), abstract_like(opt_state), None)
        )
        found = self.ckpt.restore_newest_good(*self.targets, warn=workdir_lib.warn if self.is_main else None)
        if found is None:  # a fresh start (or no step orbax lists): this run's config is the workdir's
            if self.is_main:
                write_run_config(self.cfg_given, self.workdir)
            return
        self.latest, restored = found
        self.params = {"policy": restored[0], "head": restored[3]} if self.joint else restored[0]
        self.opt_state, meta = restored[1], restored[2]
        # each saved process's loader state and truncation count (a 1-process run saves only its own)
        saved = meta.get("processes") or [meta]
        try:
            self.loader.set_states([p["loader"] for p in saved])
        except ConfigError as e:  # name the checkpoint and the data it no longer matches
            raise ConfigError(
                f"{self.ckpt.directory}/{self.latest} with data.train={self.data_path}: {e}"
            ) from None
        if len(saved) == self.pc:
            self.rows_truncated = int(saved[self.pi].get("rows_truncated", 0))
        else:  # another process count: the job's count, shared out as the loader shares its counters
            total = sum(int(p.get("rows_truncated", 0)) for p in saved)
            self.rows_truncated = sources.host_share(total, self.pi, self.pc)
        self.skipped_total = int(meta.get("skipped_nonfinite_steps", 0))
        self.in_a_row = int(meta.get("nonfinite_in_a_row", 0))
        self.empty_steps = int(meta.get("steps_without_pairs", 0))  # an older checkpoint's: counted from here
        self.start = int(meta["step"])
        if self.two_stage and self.start >= self.total_steps and not self.ckpt.has_head(self.latest):
            # the head is fit after the last step: a run resumed at (or past) its end would run none
            raise ConfigError(
                f"{self.ckpt.directory}/{self.latest}: step {self.start} has no preference head and this run "
                f"of {self.total_steps} steps has no step left to fit it after (pba.mode=two_stage); rerun "
                f"with train.steps above {self.start}"
            )
        if self.start > self.total_steps:
            # the weights are step N's: W/config.json and the export's card would record the fewer steps
            asked = (
                f"train.steps={cfg.train.steps}"
                if cfg.train.steps > 0
                else f"train.epochs={cfg.train.epochs}"
            )
            raise ConfigError(
                f"{self.ckpt.directory}/{self.latest}: step {self.start} is past this run's {self.total_steps} "
                f"steps ({asked}); rerun with train.steps >= {self.start}, or use a new workdir for a "
                "shorter run"
            )
        if self.is_main:  # a step restored and its loader state taken: now W/config.json may say this run's
            write_run_config(self.cfg_given, self.workdir)
            print(
                f"alignx train: resuming from {self.ckpt.directory}/{self.latest} "
                f"(step {self.start} of {self.total_steps})",
                file=sys.stderr,
            )
            if len(saved) != self.pc:
                print(
                    f"alignx train: the checkpoint was saved by {len(saved)} processes, this run has {self.pc}: "
                    "the data position is shared out over them (the same global batches follow)",
                    file=sys.stderr,
                )

    def meta_for(self, step: int, hcfg=None) -> dict[str, Any]:
        """The JSON saved with a step (process 0 writes it). Each process reads its own shard of the data:
        `processes[i]` is process i's loader state and truncation count (gathered from every process;
        `loader` / `rows_truncated` are process 0's, as a 1-process run saves them)."""
        own = {"loader": self.loader.get_state(), "rows_truncated": self.rows_truncated}
        meta = {
            "step": step,
            "total_steps": self.total_steps,
            "seed": self.seed,
            **own,
            "rows_skipped": self.rows_skipped,
            "skipped_nonfinite_steps": self.skipped_total,
            "nonfinite_in_a_row": self.in_a_row,
            "steps_without_pairs": self.empty_steps,
        }
        if self.pc > 1:
            meta["processes"] = gather_json(own)
        if hcfg is not None:  # `alignx export` rebuilds the head from this
            meta["head_config"] = hcfg.to_json()
        return meta

    def save(self, step: int, two_stage_head: tuple[Any, Any] | None = None) -> None:
        # a URL metrics file is rewritten every 30 s: a kill after this checkpoint keeps the steps up to it
        try:
            self.writer.flush()
        # a bucket's hiccup must not cost the checkpoint (a preemption's save above all)
        except Exception as e:
            workdir_lib.warn(
                f"metrics.jsonl not written before step {step}'s checkpoint ({e}); retried later"
            )
        params, opt_state = self.params, self.opt_state
        if self.joint:
            self.ckpt.save(
                step, params["policy"], opt_state, self.meta_for(step, self.head_cfg), head=params["head"]
            )
        elif two_stage_head is not None:
            self.ckpt.save(
                step, params, opt_state, self.meta_for(step, two_stage_head[0]), head=two_stage_head[1]
            )
        else:
            self.ckpt.save(step, params, opt_state, self.meta_for(step))


def gather_json(value: Any) -> list[Any]:
    """`value` (JSON) of every process, in process order: one all-gather of the padded UTF-8 bytes (every
    process calls it at the same point)."""
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(value, sort_keys=True).encode("utf-8"), np.uint8)
    buf = np.zeros((agree_max(raw.size),), np.uint8)
    buf[: raw.size] = raw
    rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(jax.process_count(), -1)
    return [json.loads(bytes(r).rstrip(b"\0").decode("utf-8")) for r in rows]


def nonfinite_error(
    ckpt: TrainCheckpointer, targets: tuple, step: int, m: dict[str, float], code: int, in_a_row: int
) -> AlignXError:
    """The error of a run stopped by a non-finite step, naming the newest saved step that verifies."""
    ckpt.wait()
    good = ckpt.newest_good_step(*targets)
    last = (
        f"last finite checkpoint: step {good} (a rerun resumes from it)"
        if good is not None
        else "no finite checkpoint saved (a rerun starts over)"
    )
    what = (
        f"{describe_nonfinite(code)} not finite (loss {m.get('loss', 0.0):.4g}, "
        f"grad_norm {m.get('grad_norm', 0.0):.4g})"
    )
    if in_a_row:
        return AlignXError(
            f"non-finite loss, gradient or update in {in_a_row} steps in a row up to step {step} "
            f"(loss.max_skipped_steps): {what}; {last}; lower optim.lr"
        )
    return AlignXError(
        f"non-finite loss, gradient or update at step {step}: {what}; step {step} not saved; {last}; "
        "lower optim.lr, or set loss.nan_policy=skip to skip such steps"
    )
