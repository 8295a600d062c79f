"""`alignx plan`: compile the real train step ahead of time for a topology and report memory per device.

    alignx plan --config configs/llama3_8b_ica_gpu.py [--config.model.hf_path=llama3-8b] [--topology 8xH100] [--json OUT]

The model is built abstractly (`nnx.eval_shape`: shapes and logical axes, no weights), placed on
the config's mesh over *stand-in* devices (fake CPU devices via
`--xla_force_host_platform_device_count`, one per chip of the topology), and the step that
`alignx train` jits (`train.make_train_step`, same shardings, same donation) is lowered and
compiled. XLA's buffer assignment (`compiled.memory_analysis()`) gives the bytes one device needs:
arguments (params, optimizer state, reference, batch) + outputs - donated aliases + temporaries
(activations, gradients, gathered weights). An analytic estimate is printed beside it. A step
that does not fit the topology's memory per device is an AlignXError with the numbers.

`model.hf_path` may be an HF folder / `alignx import` checkpoint, a hub id `org/name[@revision]` (its
config.json alone is fetched), or a built-in preset name
(`llama3-8b`, `qwen2.5-7b`, `smollm2`, see PRESETS) so that no weights are needed to plan; with hf_path ''
the config's `model.preset` is planned. The topology is `--topology`, else the config's
`plan.topology`, else this machine's devices.

Caveats (stand-in devices are CPUs): the CPU compiler's fusion and bf16 handling differ from TPU
and GPU, and the flash kernels (cuDNN on GPU, Pallas splash on TPU) cannot compile for CPU stand-ins
(splash's interpret mode is a test path), so such configs are compiled with the query-chunked XLA
attention (`attention_impl='chunked'`, an upper bound on the flash kernel's memory) and the report
says so.

Modules, one concept each: `topology` (targets, the TPU compiler's devices, which compiler), `presets`
(model cards, the DecoderConfig planned), `lowering` (the train step on abstract arguments), `memory`
(bytes per device, the analytic budget), `planner` (`plan`: lower, compile, report), `render` (the
printed report), `cli` (`alignx plan`).
"""

from __future__ import annotations

from alignx_jax.plan.cli import cli_plan
from alignx_jax.plan.lowering import lower_step, plan_batch
from alignx_jax.plan.memory import analytic_bytes, shard_bytes
from alignx_jax.plan.planner import plan
from alignx_jax.plan.presets import PRESETS, decoder_config_for
from alignx_jax.plan.render import format_report, gib, param_lines
from alignx_jax.plan.topology import GiB, Topology, parse_bytes, parse_topology, tpu_topology_devices

__all__ = [
    "GiB",
    "PRESETS",
    "Topology",
    "analytic_bytes",
    "cli_plan",
    "decoder_config_for",
    "format_report",
    "gib",
    "lower_step",
    "param_lines",
    "parse_bytes",
    "parse_topology",
    "plan",
    "plan_batch",
    "shard_bytes",
    "tpu_topology_devices",
]
