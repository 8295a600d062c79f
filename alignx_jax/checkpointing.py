"""Training checkpoints: an orbax CheckpointManager over `W/checkpoints/<step>/{params,opt_state,head?,meta}`.

`params` is the decoder's parameter state as a pure dict (the layout `alignx export` restores),
`opt_state` the optax state, `head` (PBA runs only) the preference head's parameters as a pure
dict, `meta` JSON (step, rng seed, data-loader state, and for a head its `HeadConfig` under
`head_config`). Saves are asynchronous by default: the step loop continues while the arrays are
written; `wait()` blocks until the last save is durable (before exit and before deciding a run is
finished).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from alignx_jax.errors import CheckpointError

ITEMS = ("params", "opt_state", "head", "meta")


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


class TrainCheckpointer:
    """Save/restore params + optimizer state (+ head) + JSON meta by step, keeping the newest `keep`."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max(1, int(keep)), create=True,
                                               enable_async_checkpointing=bool(async_save))
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def has_head(self, step: int) -> bool:
        return os.path.isdir(os.path.join(self.directory, str(int(step)), "head"))

    def save(self, step: int, params: Any, opt_state: Any, meta: dict[str, Any], head: Any = None) -> None:
        items = dict(params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                     meta=ocp.args.JsonSave(meta))
        if head is not None:  # an item left out of the Composite is simply not written for this step
            items["head"] = ocp.args.StandardSave(head)
        self._mngr.save(int(step), args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_params: Any, abstract_opt_state: Any,
                abstract_head: Any = None) -> tuple[Any, ...]:
        """Restore straight into the shardings carried by the abstract trees (ShapeDtypeStructs).

        Returns (params, opt_state, meta), or (params, opt_state, meta, head) when `abstract_head`
        is given (CheckpointError if that step has no head).
        """
        items = dict(params=ocp.args.StandardRestore(abstract_params),
                     opt_state=ocp.args.StandardRestore(abstract_opt_state), meta=ocp.args.JsonRestore())
        if abstract_head is not None:
            if not self.has_head(step):
                raise CheckpointError(f"{self.directory}/{step}: no head/ item (the run that wrote it trained "
                                      "no preference head); use a fresh workdir for a different config")
            items["head"] = ocp.args.StandardRestore(abstract_head)
        try:
            out = self._mngr.restore(int(step), args=ocp.args.Composite(**items))
        except Exception as e:  # a foreign / half-written / different-model checkpoint
            raise CheckpointError(f"{self.directory}/{step}: cannot restore ({type(e).__name__}: {_first_line(e)}); "
                                  "use a fresh workdir for a different model or config") from None
        res = (out["params"], out["opt_state"], dict(out["meta"]))
        return res + (out["head"],) if abstract_head is not None else res

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def read_meta(checkpoints_dir: str, step: int) -> dict[str, Any]:
    """The JSON `meta` item of one saved step (no arrays are read)."""
    mngr = ocp.CheckpointManager(os.path.abspath(checkpoints_dir), item_names=ITEMS)
    try:
        out = mngr.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:
        raise CheckpointError(f"{checkpoints_dir}/{step}: cannot read meta "
                              f"({type(e).__name__}: {_first_line(e)})") from None
    finally:
        mngr.close()
    return dict(out["meta"])


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree of arrays: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
