"""Every shipped config loads, carries the release's recipe, and rejects misspelt keys."""

from __future__ import annotations

import glob
import os

import pytest

from alignx_jax.config import config_to_json, load_config
from alignx_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py")) if not p.endswith("base.py"))
# the real-model configs reproduce the release's recipe; tiny_* and demo_* are CPU configs with their own budgets
REAL = [p for p in CONFIGS if not os.path.basename(p).startswith(("tiny", "demo"))]
SECTIONS = ("model", "data", "loss", "optim", "train", "mesh", "sharding", "checkpoint", "pba")


def test_expected_configs_exist():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {
        "tiny_cpu.py",
        "tiny_pba.py",
        "llama3_8b_ica_gpu.py",
        "qwen2_5_7b_ica_gpu.py",
        "llama3_8b_pba_tpu_v5p_64.py",
        "llama3_70b_pba_tpu_v5p_256.py",
        "llama3_70b_pba_gpu_64xh100.py",
    } <= names


@pytest.mark.parametrize(
    "name, topology, mesh, micro",
    [
        ("llama3_70b_pba_tpu_v5p_256.py", "v5p-256", (1, -1, 1), 128),
        ("llama3_70b_pba_gpu_64xh100.py", "64xH100", (1, 8, 8), 8),
    ],
)
def test_70b_configs_name_their_preset_topology_and_mesh(name, topology, mesh, micro):
    """The 70B PBA configs plan as given (`alignx plan --config=F`): preset, topology, a mesh that
    covers the topology's devices, joint PBA at the release's sequence and batch."""
    from alignx_jax.config_rules import validate_config
    from alignx_jax.plan import parse_topology

    c = load_config(os.path.join(ROOT, "configs", name), [])
    validate_config(
        load_config(
            os.path.join(ROOT, "configs", name),
            ["--config.workdir=/tmp/w", "--config.model.hf_path=/m", "--config.data.train=/d"],
        )
    )  # a run of it (train needs these three)
    assert (c.model.preset, c.model.hf_path, c.plan.topology) == ("llama3-70b", "", topology)
    assert (c.mesh.data, c.mesh.fsdp, c.mesh.tensor) == mesh and c.train.micro_batch == micro
    assert (c.data.method, c.pba.enabled, c.pba.mode) == ("pba", True, "joint") and c.train.distributed
    assert (c.data.max_length, c.train.global_batch) == (8192, 128)
    n = parse_topology(topology).num_devices
    fixed = c.mesh.data * c.mesh.tensor * (c.mesh.fsdp if c.mesh.fsdp > 0 else 1)
    assert n % fixed == 0 and (c.mesh.fsdp == -1 or fixed == n)
    batch_ways = c.mesh.data * (c.mesh.fsdp if c.mesh.fsdp > 0 else n // fixed)
    assert c.train.micro_batch % batch_ways == 0  # whole pairs per batch shard


@pytest.mark.parametrize("path", REAL, ids=os.path.basename)
def test_real_configs_plan_their_own_model(path):
    """`alignx plan` compiles model.preset without weights: the model the file is named for (the Qwen
    config inherited the Llama one's preset and planned Llama-3-8B)."""
    c = load_config(path, [])
    assert c.model.preset and c.model.preset.replace(".", "_").replace("-", "_") in os.path.basename(path)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_loads_with_all_sections(path):
    c = load_config(path, ["--config.workdir=/tmp/w"])
    assert c.workdir == "/tmp/w"
    for s in SECTIONS:
        assert s in c, s
    assert c.loss.type in ("sigmoid", "cdpo", "robust", "hinge", "ipo")
    assert c.data.method in ("ica", "pba", "none")
    assert c.train.micro_batch == 0 or c.train.global_batch % c.train.micro_batch == 0
    assert '"workdir": "/tmp/w"' in config_to_json(c)


def test_a_home_tilde_in_path_keys_is_the_home_folder(tmp_path, monkeypatch):
    """`--config.workdir=~/x`: bash leaves a `~` after `=` as written, and the run made a `./~/x` folder;
    the path keys expand it as the shell would, URLs and names stay as given."""
    from alignx_jax import paths
    from alignx_jax.train.setup import prepare_workdir

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    path = os.path.join(ROOT, "configs", "tiny_cpu.py")
    c = load_config(
        path,
        [
            "--config.workdir=~/x",
            "--config.data.train=~/d.jsonl",
            "--config.data.eval=~",
            "--config.model.hf_path=~/m",
            "--config.model.tokenizer=~/t",
        ],
    )
    assert (c.workdir, c.data.train, c.data.eval) == (f"{home}/x", f"{home}/d.jsonl", str(home))
    assert (c.model.hf_path, c.model.tokenizer) == (f"{home}/m", f"{home}/t")
    prepare_workdir(c, paths.absolute(c.workdir)).release()  # what `alignx train` makes of the workdir
    assert (home / "x" / "train.lock").is_file() and not (tmp_path / "~").exists()
    kept = load_config(
        path, ["--config.workdir=gs://b/~/x", "--config.model.hf_path=org/~m", "--config.data.train=a~"]
    )
    assert (kept.workdir, kept.model.hf_path, kept.data.train) == ("gs://b/~/x", "org/~m", "a~")


@pytest.mark.parametrize("path", REAL, ids=os.path.basename)
def test_real_configs_follow_release_recipe(path):
    c = load_config(path, ["--config.model.hf_path=/m", "--config.data.train=/d"])
    assert c.model.hf_path == "/m" and c.data.train == "/d"
    assert not c.model.init.enabled and c.data.synth_users == 0  # never silently random-init / synth
    assert (c.train.global_batch, c.optim.lr, c.train.epochs, c.train.steps) == (128, 5e-7, 1, -1)
    assert (c.optim.b1, c.optim.b2, c.optim.weight_decay, c.optim.clip) == (0.9, 0.95, 0.0, 1.0)
    assert (c.optim.warmup_ratio, c.optim.min_lr_ratio) == (0.1, 0.1)
    assert (c.loss.type, c.loss.beta, c.loss.label_smoothing, c.loss.sft_weight) == ("sigmoid", 0.1, 0.0, 0.0)
    assert c.data.max_length == 8192 and max(c.data.buckets) == 8192 and c.data.overflow == "drop"
    assert c.train.seed == 42
    assert (c.model.dtype, c.model.param_dtype, c.model.remat, c.model.scan_layers) == (
        "bfloat16",
        "bfloat16" if c.model.lora.rank else "float32",  # LoRA: a frozen bf16 base, float32 adapters
        "full",
        True,
    )


def test_tiny_configs_are_tiny_and_self_contained():
    for name in ("tiny_cpu.py", "tiny_pba.py"):
        c = load_config(os.path.join(ROOT, "configs", name))
        assert c.model.hf_path == "" and c.model.init.enabled and c.data.train == ""
        assert c.data.synth_users > 0
        assert c.model.init.hidden_size <= 64 and c.model.init.num_hidden_layers <= 4
    pba = load_config(os.path.join(ROOT, "configs", "tiny_pba.py"))
    assert pba.data.method == "pba" and pba.pba.enabled
    for k in (
        "enabled",
        "weight",
        "stop_gradient",
        "pooling",
        "hidden",
        "class_weights",
        "mode",
        "preference",
    ):
        assert k in pba.pba


def test_override_types_and_errors():
    path = os.path.join(ROOT, "configs", "tiny_cpu.py")
    c = load_config(
        path,
        [
            "--config.train.steps=3",
            "--config.optim.lr=0.5",
            "--config.mesh.fsdp=2",
            "--config.checkpoint.async=false",
            "--config.data.buckets=(64, 128)",
        ],
    )
    assert c.train.steps == 3 and c.optim.lr == 0.5 and c.mesh.fsdp == 2
    assert c.checkpoint["async"] is False and tuple(c.data.buckets) == (64, 128)
    with pytest.raises(ConfigError, match="train.stpes"):
        load_config(path, ["--config.train.stpes=3"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(path, ["--config.train.steps=many"])


@pytest.mark.parametrize(
    "key, message",
    [
        (
            "train.stpes",
            "unknown config key 'train.stpes' in --config.train.stpes (did you mean train.steps?)",
        ),
        ("trian.steps", "unknown config key 'trian' in --config.trian.steps (did you mean train?)"),
        ("train.lr", "unknown config key 'train.lr' in --config.train.lr (did you mean optim.lr?)"),
        (
            "checkpoint.async_",
            "unknown config key 'checkpoint.async_' in --config.checkpoint.async_ (did you mean checkpoint.async?)",
        ),
        ("optim.schedule", "unknown config key 'optim.schedule' in --config.optim.schedule"),  # none near
    ],
)
def test_an_unknown_key_names_the_nearest_known_one(key, message):
    with pytest.raises(ConfigError) as e:
        load_config(os.path.join(ROOT, "configs", "tiny_cpu.py"), [f"--config.{key}=3"])
    assert str(e.value) == message


def test_an_unknown_key_set_by_a_config_file_names_the_nearest_known_one():
    from alignx_jax.config_schema import check_types

    c = load_config(os.path.join(ROOT, "configs", "tiny_cpu.py"), [])
    with c.unlocked():
        c.data.prompt_fromat = "paper"
    with pytest.raises(ConfigError) as e:
        check_types(c)
    assert str(e.value) == (
        "unknown config key 'data.prompt_fromat' (not in alignx_jax.config_schema) "
        "(did you mean data.prompt_format?)"
    )


@pytest.mark.parametrize(
    "raw, want",
    [
        ("q_proj,v_proj", ("q_proj", "v_proj")),
        ("q_proj, v_proj", ("q_proj", "v_proj")),
        ("q_proj v_proj", ("q_proj", "v_proj")),
        ("(q_proj,v_proj)", ("q_proj", "v_proj")),
        ("q_proj", ("q_proj",)),
        ("('q_proj', 'v_proj')", ("q_proj", "v_proj")),  # Python's literal, as before
        ("['o_proj']", ("o_proj",)),
    ],
)
def test_a_list_of_names_overrides_without_python_quotes(raw, want):
    """`--config.model.lora.targets=q_proj,v_proj` (the way `data.buckets=256,512` is given) was
    ml_collections' `Could not override field 'targets' (reference) ... cannot be casted to type <class
    'tuple'>`: only a quoted Python tuple worked. Bare names, comma- or space-separated, are the tuple."""
    path = os.path.join(ROOT, "configs", "tiny_cpu.py")
    c = load_config(path, [f"--config.model.lora.targets={raw}"])
    assert tuple(c.model.lora.targets) == want


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "data.buckets=256 512",
            "--config.data.buckets: expected comma-separated integers like 256,512,1024, got '256 512'",
        ),
        (
            "data.buckets=256,x",
            "--config.data.buckets: expected comma-separated integers like 256,512,1024, got '256,x'",
        ),
        (
            "pba.class_weights=1 2 3",
            "--config.pba.class_weights: expected comma-separated numbers like 1.0,1.0,1.0, got '1 2 3'",
        ),
        (
            "sharding.rules=batch data",
            "--config.sharding.rules: expected a tuple written as a Python literal, got 'batch data'",
        ),
    ],
)
def test_a_list_key_given_no_list_is_one_line_naming_the_form(override, message):
    """`--config.data.buckets=256 512` (a space for a comma) was ml_collections' `Could not override field
    'buckets' (reference). 256 512 is of original type <class 'str'> and cannot be casted to type <class
    'tuple'>`: every list-valued key now names itself and the form it takes; one number is a one-item list."""
    path = os.path.join(ROOT, "configs", "tiny_cpu.py")
    with pytest.raises(ConfigError) as e:
        load_config(path, [f"--config.{override}"])
    assert str(e.value) == message
    assert tuple(load_config(path, ["--config.data.buckets=2048"]).data.buckets) == (2048,)
    assert tuple(load_config(path, ["--config.data.buckets=256,512"]).data.buckets) == (256, 512)


@pytest.mark.parametrize("raw", ["(1,1,nan)", "1,inf,1", "1.0, -Infinity, 2"])
def test_class_weights_spelling_nan_or_inf_get_the_finite_number_line(raw):
    """`pba.class_weights=(1,1,nan)` was refused as "expected comma-separated numbers": nan is no Python
    literal. Spelt out, nan and inf are parsed so the config check names what is wrong: not finite."""
    from alignx_jax.config_rules import validate_config

    path = os.path.join(ROOT, "configs", "tiny_pba.py")
    cfg = load_config(path, ["--config.workdir=/tmp/x", f"--config.pba.class_weights={raw}"])
    with pytest.raises(
        ConfigError, match=r"^pba\.class_weights must be finite and >= 0 with one above 0, got \("
    ):
        validate_config(cfg)
    # integers take no nan, and text that is no number is still the form's line
    with pytest.raises(ConfigError, match="expected comma-separated integers like"):
        load_config(path, ["--config.data.buckets=128,nan"])
    with pytest.raises(ConfigError, match="expected comma-separated numbers like"):
        load_config(path, ["--config.pba.class_weights=1,x,nan"])


def test_override_value_as_the_next_argument():
    """`--config.KEY VALUE` (two arguments) works like `--config.KEY=VALUE`, typed the same way."""
    path = os.path.join(ROOT, "configs", "tiny_cpu.py")
    c = load_config(
        path,
        [
            "--config.train.steps",
            "5",
            "--config.optim.lr=0.5",
            "--config.optim.warmup_ratio",
            "-0.0",
            "--config.checkpoint.async",
            "false",
            "--config.data.buckets",
            "(64, 128)",
        ],
    )
    assert c.train.steps == 5 and c.optim.lr == 0.5 and c.optim.warmup_ratio == 0.0
    assert c.checkpoint["async"] is False and tuple(c.data.buckets) == (64, 128)
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(path, ["--config.train.steps", "many"])


def test_cli_hands_space_form_overrides_over_as_key_value(monkeypatch):
    from alignx_jax import cli

    seen = {}
    monkeypatch.setattr(cli, "_handler_for", lambda args: lambda a: seen.update(vars(a)) or 0)
    rc = cli.main(
        [
            "train",
            "--config",
            "C.py",
            "--config.train.steps",
            "5",
            "--config.workdir=/tmp/w",
            "--config.optim.lr",
            "-1e-3",
        ]
    )
    assert rc == 0 and seen["config_path"] == "C.py"
    assert seen["overrides"] == [
        "--config.train.steps=5",
        "--config.workdir=/tmp/w",
        "--config.optim.lr=-1e-3",
    ]


@pytest.mark.parametrize("tail", [[], ["--config.workdir=/tmp/w"], ["--config", "C.py"]])
def test_override_without_a_value_is_one_line_naming_the_key(tail, capsys):
    from alignx_jax.cli import main

    path = os.path.join(ROOT, "configs", "tiny_cpu.py")
    with pytest.raises(ConfigError, match=r"--config\.train\.steps needs a value"):
        load_config(path, ["--config.train.steps", *tail])
    rc = main(["train", "--config", path, "--config.train.steps", *tail])
    err = capsys.readouterr().err
    assert rc == 1 and "--config.train.steps needs a value" in err and len(err.strip().splitlines()) == 1
