"""The run config's one schema (alignx_jax.config_schema): defaults built from the section dataclasses,
every shipped config loads and validates, a wrong type or value is one ConfigError line naming the key,
and a config saved by an older version merges over today's defaults."""

from __future__ import annotations

import ast
import dataclasses
import glob
import json
import os

import ml_collections
import pytest

from alignx_jax import config_rules as rules
from alignx_jax import config_schema as schema
from alignx_jax import losses
from alignx_jax.config import config_to_json, load_config
from alignx_jax.config_types import matches_type
from alignx_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.py")


def _variants(path: str) -> list[str]:
    """`path`, plus `path:quick` when its get_config takes a variant and knows 'quick'."""
    text = open(path, encoding="utf-8").read()
    tree = ast.parse(text)
    get_config = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "get_config")
    takes_variant = bool(get_config.args.args)
    return [path, f"{path}:quick"] if takes_variant and '"quick"' in text else [path]


SHIPPED = [v for p in CONFIGS for v in _variants(p)]


def _leaves(cfg: ml_collections.ConfigDict, cls: type, prefix: str = ""):
    for key, tp in schema.section_fields(cls):
        if dataclasses.is_dataclass(tp):
            yield from _leaves(cfg[key], tp, f"{prefix}{key}.")
        else:
            yield prefix + key, cfg[key], tp


def test_default_config_is_the_dataclasses():
    cfg = schema.default_config()
    leaves = list(_leaves(cfg, schema.RunConfig))
    assert len(leaves) > 90
    for name, value, tp in leaves:
        assert matches_type(value, tp), (name, value, tp)
    # base.py returns exactly this
    assert config_to_json(load_config(os.path.join(ROOT, "configs", "base.py"))) == config_to_json(cfg)
    assert cfg.checkpoint["async"] is True
    assert cfg.loss.type == "sigmoid" and cfg.data.buckets == (1024, 2048, 4096, 8192)


def test_loss_types_come_from_losses():
    assert schema.LossSection.__annotations__["type"].__args__ == losses.PREFERENCE_LOSS_TYPES


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: os.path.relpath(p, ROOT))
def test_shipped_config_loads_and_validates(path, tmp_path):
    overrides = [f"--config.workdir={tmp_path}/w"]
    cfg = load_config(path, overrides)
    schema.check_types(cfg)
    if not cfg.model.hf_path and not cfg.model.init.enabled:
        cfg = load_config(path, [*overrides, "--config.model.hf_path=/m"])
    if not cfg.data.train and cfg.data.synth_users <= 0:
        cfg = load_config(path, [*overrides, "--config.model.hf_path=/m", "--config.data.train=/d"])
    rules.validate_config(cfg)


def test_quick_variants_are_found():
    assert any(p.endswith("demo_cpu.py:quick") for p in SHIPPED)


@pytest.mark.parametrize(
    "override, message",
    [
        # a value of the wrong type set by a config file or code (an override is parsed by the key's type)
        (("train", "steps", "abc"), "train.steps='abc': expected an integer"),
        (("train", "steps", 2.5), "train.steps=2.5: expected an integer"),
        (("train", "progress", 1), "train.progress=1: expected a boolean"),
        (("data", "buckets", (256, "x")), "data.buckets=(256, 'x'): expected a tuple of integers"),
        (("pba", "class_weights", (1.0, 2.0)), "pba.class_weights=(1.0, 2.0): expected a tuple of 3 numbers"),
        (("loss", "type", "kto"), "loss.type='kto': expected one of sigmoid, "),
        (("model", "remat", "most"), "model.remat='most': expected one of none, full, dots, dots_no_batch"),
        (("data", "prompt_format", "raw"), "data.prompt_format='raw': expected one of chat, paper, release"),
        (("data", "overflow", "cut"), "data.overflow='cut': expected one of truncate, drop"),
        (("pba", "pooling", "max"), "pba.pooling='max': expected one of mean, last"),
    ],
)
def test_wrong_type_or_value_is_one_line_naming_the_key(override, message):
    section, key, value = override
    cfg = load_config(TINY, ["--config.workdir=/tmp/x"])
    with cfg.unlocked(), cfg[section].ignore_type():
        cfg[section][key] = value
    with pytest.raises(ConfigError) as e:
        rules.validate_config(cfg)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("fmt", ["chat", "paper", "release"])
def test_share_prompt_buckets_must_hold_the_longest_kept_pair(fmt):
    """A kept pair with a short prompt and two long responses is 2 x max_length - 1 tokens as one row: a
    largest bucket below that is refused up front, in one line (found in a batch, it stopped the run)."""
    from alignx_jax.data import batching

    def config(buckets):
        return load_config(
            TINY,
            [
                "--config.workdir=/tmp/x",
                "--config.data.max_length=128",
                f"--config.data.prompt_format={fmt}",
                "--config.data.share_prompt=true",
                f"--config.data.buckets={buckets}",
            ],
        )

    for buckets in ("(192,)", "(128,254)"):  # 192 = 128 + reserve(128), the bound the check used before
        with pytest.raises(ConfigError) as e:
            rules.validate_config(config(buckets))
        message = str(e.value)
        assert "\n" not in message and "data.buckets" in message and "data.max_length" in message, message
        assert "255 tokens" in message, message
    # the largest kept pair fits a bucket of exactly the bound, which stays accepted
    rules.validate_config(config("(128,255)"))
    L = 128
    longest = batching._fit(
        [1], [2] * (L - 2), [3] * (L - 2), max_length=L, prompt_format=fmt, overflow="drop", eval_mode=False
    )
    assert longest is not None and not longest[3]  # kept whole
    p, c, r, _ = longest
    assert len(p) + (len(c) + 1) + (len(r) + 1) == batching.shared_row_bound(L) == 255


def test_wandb_project_without_wandb_is_refused_by_the_config_check(monkeypatch, tmp_path):
    """Before the workdir or the checkpoint manager exists: one line, nothing written."""
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # not importable
    cfg = load_config(TINY, [f"--config.workdir={tmp_path}/w", "--config.train.wandb_project=proj"])
    with pytest.raises(
        ConfigError, match=r"^train\.wandb_project='proj' needs the wandb package: pip install wandb"
    ):
        rules.validate_config(cfg)
    assert not (tmp_path / "w").exists()


def test_int_is_a_float_and_literal_checked_on_overrides():
    cfg = load_config(TINY, ["--config.workdir=/tmp/x", "--config.loss.beta=1", "--config.optim.lr=1"])
    rules.validate_config(cfg)
    with pytest.raises(ConfigError, match=r"expected an integer, got 'abc'"):
        load_config(TINY, ["--config.train.steps=abc"])
    for args in (["--config.loss.nan_policy=ignore"], ["--config.loss.nan_policy", "ignore"]):
        cfg = load_config(TINY, ["--config.workdir=/tmp/x", *args])
        with pytest.raises(ConfigError, match=r"^loss\.nan_policy='ignore': expected one of stop, skip$"):
            rules.validate_config(cfg)


def test_missing_and_unknown_keys():
    cfg = schema.default_config()
    del cfg.train["eval_every"]
    with pytest.raises(ConfigError, match=r"config key train\.eval_every is missing"):
        schema.check_types(cfg)
    cfg = schema.default_config()
    cfg.train.stpes = 3
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.stpes'"):
        schema.check_types(cfg)


@pytest.mark.parametrize("command", ["train", "plan"])
def test_a_config_file_missing_a_section_is_named(tmp_path, command):
    """A get_config() returning a ConfigDict without whole sections said "config key model is missing"
    without saying which file: `alignx train` and `alignx plan` name it (before any override, which the
    missing section would refuse as an unknown key)."""
    import argparse

    from alignx_jax.plan.cli import cli_plan
    from alignx_jax.train.cli import cli_train

    path = tmp_path / "partial.py"
    path.write_text(
        "import ml_collections\n"
        "def get_config():\n"
        "    return ml_collections.ConfigDict({'workdir': '', 'train': {'steps': 3}})\n"
    )
    run = {"train": cli_train, "plan": cli_plan}[command]
    args = argparse.Namespace(config_path=str(path), overrides=["--config.model.hf_path=/m"], json=None)
    with pytest.raises(ConfigError) as e:
        run(args)
    assert str(e.value).startswith(f"{path}: config key model is missing: build configs from"), str(e.value)
    # a file holding every key loads as before
    assert schema.check_keys_present(load_config(TINY)) is None


def test_saved_config_lacking_newer_keys_merges_over_defaults():
    saved = json.loads(config_to_json(load_config(TINY, ["--config.workdir=/tmp/old"])))
    del saved["loss"]["nan_policy"], saved["train"]["eval_every"], saved["model"]["lora"]
    saved["train"]["a_removed_key"] = 1
    saved["loss"]["beta"] = 0.3
    cfg = schema.merge_saved(saved)
    assert cfg.loss.nan_policy == "stop" and cfg.train.eval_every == 0 and cfg.model.lora.rank == 0
    assert cfg.loss.beta == 0.3 and cfg.workdir == "/tmp/old"
    assert "a_removed_key" not in cfg.train
    # JSON lists are the tuples the config held
    assert cfg.data.buckets == tuple(saved["data"]["buckets"]) and isinstance(cfg.sharding.rules[0], tuple)
    rules.validate_config(cfg)
    saved["train"]["steps"] = "many"
    with pytest.raises(ConfigError, match=r"saved config: train\.steps='many': expected an integer"):
        schema.merge_saved(saved)


@pytest.mark.parametrize("name", ["config.json", "config.yaml"])
def test_a_config_that_is_not_python_is_refused_in_one_line(tmp_path, name):
    path = tmp_path / name
    path.write_text('{"model": {}}\n')
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert str(e.value) == f"{path}: not a Python config file (a .py file that defines get_config())"
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "absent.py"))


@pytest.mark.parametrize(
    "body, said",
    [
        ('def get_config():\n    raise RuntimeError("boom")\n', "RuntimeError: boom"),
        ("def get_config():\n    return undefined_name\n", "NameError: name 'undefined_name' is not defined"),
        ("def get_config():\n    return get_config()\n", "RecursionError: "),
    ],
)
def test_a_get_config_that_raises_is_one_line_naming_the_file(tmp_path, body, said):
    """Any error of the file's get_config(), not only a wrong argument's TypeError: one line, no traceback."""
    path = tmp_path / "broken.py"
    path.write_text(body)
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    text = str(e.value)
    assert text.startswith(f"{path}: get_config() without an argument failed: {said}") and "\n" not in text


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--config.model.lora.rank=-1"], "model.lora.rank=-1 must be a non-negative integer (0 = LoRA off)"),
        (["--config.model.lora.alpha=-2"], "model.lora.alpha=-2.0 must be >= 0 and finite (0 = 2 * rank)"),
        (["--config.model.lora.alpha=nan"], "model.lora.alpha=nan must be >= 0 and finite (0 = 2 * rank)"),
        (["--config.model.lora.alpha=inf"], "model.lora.alpha=inf must be >= 0 and finite (0 = 2 * rank)"),
        (
            ["--config.model.lora.targets=q_prj"],
            "model.lora.targets: unknown projection 'q_prj' (known: q_proj,",
        ),
        (
            ["--config.model.frozen_layers=-1"],
            "model.frozen_layers must be >= 0 (0 = every block trains), got -1",
        ),
        (
            ["--config.model.frozen_layers=2"],
            "model.frozen_layers=2 must be below model.init.num_hidden_layers=2",
        ),
    ],
)
def test_lora_and_frozen_layers_are_checked_by_the_config_check(overrides, message):
    """Refused by validate_config (train and plan), not by the model build after the workdir is taken."""
    for inputs in (True, False):
        cfg = load_config(TINY, ["--config.workdir=/tmp/x", *overrides])
        with pytest.raises(ConfigError) as e:
            rules.validate_config(cfg, inputs=inputs)
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
    # a loaded model's depth is unknown here (its build checks it); a valid combination passes
    hf = ["--config.workdir=/tmp/x", "--config.model.hf_path=/m", "--config.model.frozen_layers=2"]
    rules.validate_config(load_config(TINY, hf))
    ok = [
        "--config.model.frozen_layers=1",
        "--config.model.lora.rank=4",
        "--config.model.lora.targets=q_proj",
    ]
    rules.validate_config(load_config(TINY, ["--config.workdir=/tmp/x", *ok]))


def test_a_bad_lora_rank_leaves_no_workdir(tmp_path, capsys):
    from alignx_jax.cli import main

    w = tmp_path / "w"
    argv = ["train", f"--config={TINY}", f"--config.workdir={w}", "--config.model.lora.rank=-1"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err == "alignx: error: model.lora.rank=-1 must be a non-negative integer (0 = LoRA off)"
    assert not w.exists()


@pytest.mark.parametrize("hidden", [0, -3])
def test_pba_hidden_is_checked_by_the_config_check(hidden):
    pba = ["--config.data.method=pba", "--config.pba.enabled=true"]
    cfg = load_config(TINY, ["--config.workdir=/tmp/x", *pba, f"--config.pba.hidden={hidden}"])
    with pytest.raises(ConfigError) as e:
        rules.validate_config(cfg)
    assert str(e.value) == f"pba.hidden must be at least 1 (the head's hidden width), got {hidden}"
    rules.validate_config(load_config(TINY, ["--config.workdir=/tmp/x", *pba, "--config.pba.hidden=1"]))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: os.path.relpath(p, ROOT))
def test_shipped_config_validates_for_plan_and_its_saved_json_reads_back_the_same(path):
    """`alignx plan --config=F` checks the file as given (no workdir, weights or data); W/config.json read
    back (`merge_saved`) is the same config: tuples stay tuples, floats and None stay themselves."""
    cfg = load_config(path)
    rules.validate_config(cfg, inputs=False)
    back = schema.merge_saved(json.loads(config_to_json(cfg)))
    assert back.to_dict() == cfg.to_dict()  # a list where a tuple was differs here
    assert config_to_json(back) == config_to_json(cfg)
    assert isinstance(back.data.buckets, tuple) and isinstance(back.sharding.rules[0], tuple)
