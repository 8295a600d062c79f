"""Every training mode, one after another, in one process of a JAX job: tests/test_multiprocess.py runs it
as one 8-device process and as `launch/local.sh 2 python tests/mp_modes.py OUT` (2 x 4 devices), once
each, and compares each mode's losses.

    python tests/mp_modes.py OUT [MODE ...]     (OUT/<mode> is each mode's workdir; default: all modes)
"""

from __future__ import annotations

import os
import sys
import time

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
}


def main(argv: list[str]) -> int:
    from alignx_jax import distributed

    distributed.initialize_from_env()  # as `alignx` does before any command
    import jax

    from alignx_jax.config import load_config
    from alignx_jax.train.loop import run_training

    out, names = argv[0], argv[1:] or list(MODES)
    for name in names:
        path, extra = MODES[name]
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
