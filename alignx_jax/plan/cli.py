"""`alignx plan`'s handler: stand-in CPU devices for the topology (in a child process when JAX already
started with fewer), the report printed and written as JSON, an error when the step does not fit."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from alignx_jax import paths
from alignx_jax.config import load_config
from alignx_jax.config_rules import validate_config
from alignx_jax.config_schema import check_keys_present
from alignx_jax.errors import AlignXError, ConfigError
from alignx_jax.hardware import backends_initialized
from alignx_jax.plan.planner import plan
from alignx_jax.plan.render import does_not_fit, format_report, param_lines
from alignx_jax.plan.topology import parse_topology

_CHILD_ENV = "ALIGNX_PLAN_CHILD"


def _provide_devices(n: int) -> bool:
    """Make sure this process will see >= n CPU devices. False when jax already started with fewer
    (the caller then re-runs the command in a child process)."""
    if backends_initialized():
        import jax

        return jax.device_count() >= n
    flags, have = [], 1
    for f in os.environ.get("XLA_FLAGS", "").split():
        if f.startswith("--xla_force_host_platform_device_count="):
            have = int(f.split("=", 1)[1])  # never lower a count someone else asked for
        else:
            flags.append(f)
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={max(n, have)}"])
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:
        import jax

        jax.config.update("jax_platforms", "cpu")
    return True


def _plan_in_child(args: argparse.Namespace, topology_name: str) -> int:
    """This command again in a fresh process, whose JAX starts with the stand-in devices."""
    argv = [
        sys.executable,
        "-m",
        "alignx_jax",
        "plan",
        "--config",
        args.config_path,
        *(getattr(args, "overrides", []) or []),
        "--topology",
        topology_name,
    ]
    if args.json:
        argv += ["--json", args.json]
    if getattr(args, "compiler", None):
        argv += ["--compiler", args.compiler]
    if getattr(args, "verbose", False):
        argv.append("--verbose")
    env = dict(os.environ, **{_CHILD_ENV: "1"})
    env.pop("XLA_FLAGS", None)
    env.pop("JAX_PLATFORMS", None)
    return subprocess.call(argv, env=env)


def _is_plan(p: str) -> bool:
    """Whether the file `p` is an earlier `alignx plan --json` report (its keys)."""
    report = paths.read_json(p)
    return isinstance(report, dict) and {"topology", "per_device_bytes", "fits"} <= report.keys()


def _refuse_foreign_json(dest: str, config_path: str) -> None:
    """--json replaces an earlier plan report only: never the --config file (named as such), never another
    existing file (model.hf_path's config.json, notes, a data set), which `_is_plan` tells from a report;
    the model.hf_path folder is not walked for it."""
    config_file = config_path.rsplit(":", 1)[0] if ":" in os.path.basename(config_path) else config_path
    problem = paths.refuse_to_replace(
        "--json", dest, [("--config", config_file)], _is_plan, "an `alignx plan --json` report"
    )
    if problem:
        raise AlignXError(problem)


def cli_plan(args: argparse.Namespace) -> int:
    cfg = load_config(args.config_path, getattr(args, "overrides", []) or [], check=check_keys_present)
    validate_config(cfg, inputs=False)  # what `alignx train` would refuse is not planned
    if args.json is not None and not args.json:  # not a plan whose report silently goes nowhere
        raise AlignXError("--json: an empty path; name the report file")
    if args.json:  # before a compile that takes minutes at 70B (not distributed.check_output: it would
        # start JAX's backends before the stand-in devices are set)
        _refuse_foreign_json(args.json, args.config_path)
        try:
            paths.check_writable(args.json)
        except OSError as e:
            why = " ".join(str(e.strerror or e).split())  # a bucket's refusal is several lines
            raise AlignXError(f"--json {args.json}: cannot be written ({why})") from None
    name = args.topology or str(cfg.plan.topology) or None  # --topology, else the config's
    try:
        topo = parse_topology(name)
    except ConfigError as e:  # named where it came from: the flag or the config's key
        raise ConfigError(f"{'--topology' if args.topology else 'plan.topology'}: {e}") from None
    if topo.num_devices and not _provide_devices(topo.num_devices):
        if os.environ.get(_CHILD_ENV):
            raise AlignXError(f"could not provide {topo.num_devices} stand-in devices for {topo.name}")
        return _plan_in_child(args, name)
    report = plan(cfg, topo, compiler=getattr(args, "compiler", None))
    print(format_report(report))
    if getattr(args, "verbose", False):
        print(param_lines(report))
    if args.json:
        paths.write_all({args.json: (json.dumps(report, indent=2, default=str) + "\n").encode("utf-8")})
    if not report["fits"]:
        raise AlignXError(does_not_fit(args.config_path, report))
    return 0
