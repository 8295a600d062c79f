"""Joining a multi-process JAX job from the environment, once, before any command touches a device.

`alignx` calls `initialize_from_env()` before it dispatches every command, so that `train`, `eval`,
`export`, ... all run on the same global mesh when a launcher starts one process per host:

- `ALIGNX_COORDINATOR_ADDRESS=HOST:PORT`, `ALIGNX_NUM_PROCESSES=N`, `ALIGNX_PROCESS_ID=I` (set by
  `launch/local.sh`): an explicit job, e.g. N processes on 127.0.0.1. On CPU the cross-process
  collectives go through gloo (`ALIGNX_CPU_COLLECTIVES`, default `gloo`).
- `ALIGNX_DISTRIBUTED=1`: `jax.distributed.initialize()` with everything detected from the cluster
  (a Cloud TPU pod slice, SLURM `srun`, Open MPI, ...).

With none of these set nothing happens (one process). `initialize()` is idempotent: a second call
(e.g. `train.distributed` in a config of a run that the launcher already joined) does nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

ENV_COORDINATOR = "ALIGNX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "ALIGNX_NUM_PROCESSES"
ENV_PROCESS_ID = "ALIGNX_PROCESS_ID"
ENV_DISTRIBUTED = "ALIGNX_DISTRIBUTED"
ENV_CPU_COLLECTIVES = "ALIGNX_CPU_COLLECTIVES"
ENV_INIT_TIMEOUT = "ALIGNX_INIT_TIMEOUT"

_TRUE = ("1", "true", "yes", "auto")

T = TypeVar("T")

# signals `alignx train`'s start-up handler recorded in a multi-process job, before the trainer's own
# handler existed (`cli._exit_on_sigterm`; `train.signals.StopFlag.install` takes them over)
_early_signals: list[int] = []


def record_signal(signum: int) -> None:
    """Remember a stop signal that reached this process during start-up (a signal handler's whole job:
    the trainer's first agreed check then stops every process together)."""
    _early_signals.append(int(signum))


def take_recorded_signal() -> int | None:
    """The last signal `record_signal` remembered (None if none), forgetting them all."""
    last = _early_signals[-1] if _early_signals else None
    _early_signals.clear()
    return last


def requested(environ: dict[str, str] | None = None) -> bool:
    """Whether the environment describes a multi-process job (cheap: imports nothing)."""
    env = os.environ if environ is None else environ
    return bool(env.get(ENV_COORDINATOR)) or env.get(ENV_DISTRIBUTED, "").strip().lower() in _TRUE


def is_initialized() -> bool:
    import jax

    return bool(jax.distributed.is_initialized())


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cpu_collectives: str | None = None,
    timeout_s: int = 300,
) -> bool:
    """`jax.distributed.initialize(...)` unless this process already joined a job; returns True when it
    joined one now. With no arguments everything comes from the cluster environment."""
    import jax

    if jax.distributed.is_initialized():
        return False
    if cpu_collectives:
        # only the CPU backend reads it; harmless on TPU/GPU where XLA's own collectives are used
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=int(timeout_s),
        )
    except (ValueError, RuntimeError) as e:  # no job to join here (e.g. a pod config run off the pod)
        from alignx_jax.errors import ConfigError

        text = " ".join(str(e).split())[:300]
        raise ConfigError(
            f"cannot join a multi-process JAX job ({type(e).__name__}: {text}); on one machine set "
            "--config.train.distributed=false, or start it with a launcher in launch/"
        ) from None
    return True


def initialize_from_env(environ: dict[str, str] | None = None) -> bool:
    """Join the job the environment describes (see the module docstring); False when there is none."""
    from alignx_jax.errors import ConfigError

    env = os.environ if environ is None else environ
    if not requested(env):
        return False
    timeout = int(env.get(ENV_INIT_TIMEOUT, "300"))
    collectives = env.get(ENV_CPU_COLLECTIVES, "gloo") or None
    if env.get(ENV_COORDINATOR):
        try:
            n, i = int(env[ENV_NUM_PROCESSES]), int(env[ENV_PROCESS_ID])
        except (KeyError, ValueError):
            raise ConfigError(
                f"{ENV_COORDINATOR} is set: {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} must be integers too"
            ) from None
        if not 0 <= i < n:
            raise ConfigError(f"{ENV_PROCESS_ID}={i} is not in [0, {ENV_NUM_PROCESSES}={n})")
        return initialize(env[ENV_COORDINATOR], n, i, cpu_collectives=collectives, timeout_s=timeout)
    return initialize(cpu_collectives=collectives, timeout_s=timeout)


def check_output(dest: str, flag: str) -> None:
    """Process 0 writes `dest` at the end of a command: a place it cannot write fails now (a one-line
    AlignXError naming `flag`), on every process, before minutes of work."""
    from alignx_jax import paths
    from alignx_jax.errors import AlignXError

    problem = None
    if paths.is_main_process():
        try:  # a folder there too, local or a bucket's (a storage client's own error as an OSError)
            paths.check_writable(dest)
        except OSError as e:
            # a bucket's refusal is several lines ("Forbidden: ...\n403 ..."): one line
            why = " ".join(str(e.strerror or e).split())
            problem = AlignXError(f"{flag} {dest}: cannot be written ({why})")
    agree(problem, flag)


def refuse_on_main(why: Callable[[], str | None], flag: str) -> None:
    """Process 0 alone writes the output `flag` names, so whether the file there may be replaced is its to
    judge: `why()` (one line, None when it may: `paths.refuse_to_replace`) runs on process 0 only, of the
    file on its disk (another host's disk may hold another file under the same path), and every process
    stops on its answer (a ConfigError there, a line pointing at it on the others)."""
    from alignx_jax import paths
    from alignx_jax.errors import ConfigError

    problem = None
    if paths.is_main_process():
        line = why()
        problem = None if line is None else ConfigError(line)
    agree(problem, flag)


def write_on_main(write: Callable[[], T], flag: str) -> T | None:
    """`write()` on process 0 alone, the one writer of a job's final output (`flag` names it), then every
    process stops on its outcome: a write that fails there (a full disk) fails them all (its error there, a
    line pointing at it on the others), not process 0 alone beside the others' exit 0. Returns what
    `write()` returned (None on the other processes)."""
    from alignx_jax import paths

    problem, written = None, None
    if paths.is_main_process():
        try:
            written = write()
        except Exception as e:  # re-raised by `agree` on process 0, after the others learnt of it
            problem = e
    agree(problem, flag)
    return written


def agree(error: BaseException | None, what: str) -> None:
    """Every process of a job learns whether any of them failed at this point, and all stop together:
    the one that failed re-raises its error, the others raise a line pointing at it (else they would
    wait in the next collective for ever, or exit 0 beside a failed process). One process: re-raises."""
    import jax

    if jax.process_count() <= 1:
        if error is not None:
            raise error
        return
    import numpy as np
    from jax.experimental import multihost_utils

    from alignx_jax.errors import AlignXError

    flags = multihost_utils.process_allgather(np.asarray([error is not None], np.int32))
    failed = np.asarray(flags).reshape(-1)  # one flag per process
    if error is not None:
        raise error
    if failed.any():
        raise AlignXError(f"{what} failed on process {int(np.argmax(failed))} (its log has the error line)")
