"""Training checkpoints: an orbax CheckpointManager over `W/checkpoints/<step>/{params,opt_state,meta}`.

`params` is the decoder's parameter state as a pure dict (the layout `alignx export` restores),
`opt_state` the optax state, `meta` JSON (step, rng seed, data-loader state, ...). Saves are
asynchronous by default: the step loop continues while the arrays are written; `wait()` blocks
until the last save is durable (before exit and before deciding a run is finished).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from alignx_jax.errors import CheckpointError

ITEMS = ("params", "opt_state", "meta")


class TrainCheckpointer:
    """Save/restore params + optimizer state + JSON meta by step, keeping the newest `keep`."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max(1, int(keep)), create=True,
                                               enable_async_checkpointing=bool(async_save))
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def save(self, step: int, params: Any, opt_state: Any, meta: dict[str, Any]) -> None:
        self._mngr.save(int(step), args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, abstract_params: Any, abstract_opt_state: Any) -> tuple[Any, Any, dict]:
        """Restore straight into the shardings carried by the abstract trees (ShapeDtypeStructs)."""
        try:
            out = self._mngr.restore(int(step), args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_params),
                opt_state=ocp.args.StandardRestore(abstract_opt_state),
                meta=ocp.args.JsonRestore()))
        except Exception as e:  # a foreign / half-written / different-model checkpoint
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{self.directory}/{step}: cannot restore ({type(e).__name__}: {first}); "
                                  "use a fresh workdir for a different model or config") from None
        return out["params"], out["opt_state"], dict(out["meta"])

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree of arrays: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
