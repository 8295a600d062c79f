"""The text of a plan report: the table `alignx plan` prints, the parameter list, the does-not-fit error."""

from __future__ import annotations

from typing import Any

from alignx_jax.plan.topology import GiB


def gib(b: int) -> str:
    """A byte count as GiB, or MiB below a quarter GiB."""
    return f"{b / GiB:.2f} GiB" if abs(b) >= GiB // 4 else f"{b / 1024**2:.1f} MiB"


def format_report(r: dict[str, Any]) -> str:
    c, a = r["per_device_bytes"], r["analytic_bytes"]
    m = r["model"]
    lines = [
        f"topology {r['topology']}: {r['num_devices']} devices ({r['platform']}, compiled on "
        f"{r.get('compiler', r['stand_in'] + ' stand-ins')}), limit {gib(r['bytes_per_device_limit'])} per device",
        f"mesh {r['mesh']}; model {m['param_count'] / 1e9:.2f}B params, {m['num_hidden_layers']} layers, "
        f"dtype {m['dtype']}/{m['param_dtype']}, remat {r['remat']}, scan {r['scan_layers']}",
        f"batch: {r['global_batch']} pairs = {r['num_micro']} x {r['micro_batch']}, seq {r['seq_len']}, "
        f"{r['seqs_per_device_per_micro']} sequences per device per micro-step",
        f"compile: lower {r['lower_seconds']}s, compile {r['compile_seconds']}s",
        "per device          compiled      analytic",
        f"  params        {gib(c['params']):>12}  {gib(a['params']):>12}",
        f"  optimizer     {gib(c['optimizer']):>12}  {gib(a['optimizer']):>12}",
        f"  {'base(frozen)' if r.get('lora_rank') else 'reference':<12}  {gib(c['reference']):>12}  "
        f"{gib(a['reference']):>12}",
        f"  batch         {gib(c['batch']):>12}",
        f"  temporaries   {gib(c['temporaries']):>12}  {gib(a['temporaries']):>12}",
        f"  total         {gib(c['total']):>12}  {gib(a['total']):>12}",
        f"fits: {'yes' if r['fits'] else 'NO'} (headroom {gib(r['headroom_bytes'])})",
    ]
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines)


def param_lines(r: dict[str, Any]) -> str:
    """`--verbose`: one line a parameter, its shape, partition spec and per-device shape."""
    return "\n".join(
        f"  {p['name']:<40} {str(tuple(p['shape'])):<26} {p['spec']:<40} -> {tuple(p['per_device_shape'])}"
        for p in r["params"]
    )


def does_not_fit(config_path: str, r: dict[str, Any]) -> str:
    """The one-line error of a step that needs more than a device has, with its numbers."""
    c = r["per_device_bytes"]
    return (
        f"{config_path}: the train step needs {gib(c['total'])} per device on {r['topology']} "
        f"but a device has {gib(r['bytes_per_device_limit'])} (params {gib(c['params'])}, optimizer "
        f"{gib(c['optimizer'])}, reference {gib(c['reference'])}, temporaries {gib(c['temporaries'])}); "
        "lower train.micro_batch, enable model.remat, shorten data.max_length or use more devices"
    )
