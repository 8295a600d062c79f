"""Every training mode, one after another, in one process of a JAX job: tests/test_multiprocess.py runs it
as one 8-device process and as `launch/local.sh 2 python tests/mp_modes.py OUT` (2 x 4 devices), once
each, and compares each mode's losses.

    python tests/mp_modes.py OUT [MODE ...]     (OUT/<mode> is each mode's workdir; default: all modes)
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.py")
TINY_PBA = os.path.join(ROOT, "configs", "tiny_pba.py")

# tests/test_train.py's tiny run: 8 synthetic users, hidden 32, one bucket (one compilation per mode); the
# mesh is the 8 devices of either layout (tests/test_multiprocess.py runs `alignx train` with these too)
TRAIN = [
    "--config.model.init.hidden_size=32",
    "--config.model.init.intermediate_size=64",
    "--config.model.init.head_dim=8",
    "--config.data.synth_users=8",
    "--config.data.max_length=128",
    "--config.data.buckets=(128,)",
    "--config.loss.logps_chunk=64",
    "--config.train.global_batch=8",
    "--config.train.micro_batch=4",
    "--config.train.progress=false",
    "--config.mesh.data=2",
    "--config.mesh.fsdp=2",
    "--config.mesh.tensor=2",
]
# enough steps that a SIGTERM lands mid-run (test_sigterm_...), which resumes to these same losses
STEPS = ["--config.train.steps=12", "--config.checkpoint.every_steps=12"]
SHARED = ["--config.data.share_prompt=true", "--config.data.buckets=(256,)"]
PBA = [
    "--config.pba.max_persona_tokens=128",
    "--config.pba.head_steps=20",
    "--config.pba.head_batch_size=8",
    # token compaction in 1/4 steps: both steps keep 3/4 of the positions, one compiled step (in 1/8 steps,
    # the default, they kept 6/8 then 5/8: a second compile of each PBA step in every process)
    "--config.data.compact_tokens=4",
]
SHORT = ["--config.train.steps=2", "--config.checkpoint.every_steps=2"]
# mode -> (config file, overrides); modes are combined where they are independent (one compilation each);
# token compaction (data.compact_tokens, on by default) keeps about half of the rows of 256 where used
MODES: dict[str, tuple[str, list[str]]] = {
    "two_row": (TINY, STEPS),  # also the run the other tests of test_multiprocess.py read
    "share_prompt_precomputed": (TINY, [*SHORT, *SHARED, "--config.loss.reference=precomputed"]),
    "packing": (TINY, [*SHORT, *SHARED, "--config.data.packing=true"]),
    # the joint head (golden directions in its loss) while the prompts render predicted profiles
    "pba_joint_predicted": (TINY_PBA, [*SHORT, *PBA, "--config.pba.preference=predicted"]),
    "pba_two_stage_mix": (
        TINY_PBA,
        [*SHORT, *PBA, "--config.pba.mode=two_stage", "--config.pba.preference=mix"],
    ),
    # two buckets: a process whose rows fit the shorter is widened to the other's (its padding counted in it)
    "two_row_buckets": (
        TINY,
        [
            *SHORT,
            "--config.data.max_length=512",
            "--config.data.buckets=(256,512)",
            "--config.data.compact_tokens=0",
        ],
    ),
    # a TPU pod's mesh order: the hosts' devices alternate along the batch axes (`_interleave_hosts`), so a
    # process's pairs are batch shards 0, 2, 4, 6 of 8, not one block; packed shared-prompt rows name them
    "packing_interleaved": (
        TINY,
        [
            *SHORT,
            *SHARED,
            "--config.data.packing=true",
            "--config.mesh.data=1",
            "--config.mesh.fsdp=8",
            "--config.mesh.tensor=1",
            "--config.train.micro_batch=8",
        ],
    ),
}
INTERLEAVED = {"packing_interleaved"}


def _interleave_hosts() -> None:
    """`sharding.make_mesh` as `mesh_utils.create_device_mesh` orders a TPU slice's chips: consecutive
    mesh positions alternate between the processes (on one process: a reordering that changes nothing)."""
    import jax
    from jax.sharding import Mesh

    from alignx_jax import sharding

    plain = sharding.make_mesh

    def make_mesh(data=1, fsdp=1, tensor=1, devices=None):
        mesh = plain(data, fsdp, tensor, devices)
        flat = list(mesh.devices.flat)
        rank = {d: sorted(x.id for x in flat if x.process_index == d.process_index).index(d.id) for d in flat}
        order = sorted(flat, key=lambda d: (rank[d] if jax.process_count() > 1 else d.id, d.process_index))
        return Mesh(np.asarray(order, dtype=object).reshape(mesh.devices.shape), mesh.axis_names)

    sharding.make_mesh = make_mesh


def main(argv: list[str]) -> int:
    from alignx_jax import distributed

    distributed.initialize_from_env()  # as `alignx` does before any command
    import jax

    from alignx_jax.config import load_config
    from alignx_jax.train.loop import run_training

    out, names = argv[0], argv[1:] or list(MODES)
    plain_mesh = None
    for name in names:
        path, extra = MODES[name]
        from alignx_jax import sharding

        plain_mesh = plain_mesh or sharding.make_mesh
        sharding.make_mesh = plain_mesh
        if name in INTERLEAVED:
            _interleave_hosts()
            if jax.process_count() > 1:  # the layout this mode is for: process k holds shards k, k+2, ...
                from alignx_jax.batch import process_shards

                held = process_shards(sharding.make_mesh(1, -1, 1))
                assert held == tuple(range(jax.process_index(), 8, 2)), held
        t0 = time.perf_counter()
        cfg = load_config(path, [*TRAIN, *extra, f"--config.workdir={os.path.join(out, name)}"])
        code = run_training(cfg)
        if jax.process_index() == 0:
            print(f"mp_modes: {name}: exit {code}, {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
