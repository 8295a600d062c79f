"""The command line's usage errors: one line on stderr naming the sub-command, exit status 2 (README)."""

from __future__ import annotations

import os

import pytest

from alignx_jax.cli import build_parser, main


def _usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "usage:" not in err, err
    return err.strip()


def _commands():
    parser = build_parser()
    for name, p in parser.commands.choices.items():
        if getattr(p, "commands", None) is not None:
            yield from ([name, sub] for sub in p.commands.choices)
        else:
            yield [name]


@pytest.mark.parametrize("command", list(_commands()), ids=" ".join)
def test_every_sub_command_refuses_an_unknown_flag_in_one_line(command, capsys):
    prog = "alignx " + " ".join(command)
    err = _usage_error([*command, "--no-such-flag"], capsys)
    # the required arguments come first when missing; either way the sub-command's name and its --help
    assert err.startswith(f"{prog}: error: ") and err.endswith(f"(see {prog} --help)"), err


def test_usage_errors_are_one_line(capsys):
    err = _usage_error(
        ["eval", "--model", "m", "--benchmark", "b=x", "--out", "o", "--method", "bogus"], capsys
    )
    assert err == (
        "alignx eval: error: argument --method: invalid choice: 'bogus' (choose from 'none', 'ica', 'pba') "
        "(see alignx eval --help)"
    )
    err = _usage_error(["eval", "--model", "m", "--benchmark", "b=x", "--out", "o", "--bogus", "1"], capsys)
    assert err == "alignx eval: error: unrecognized arguments: --bogus 1 (see alignx eval --help)"
    err = _usage_error(["eval", "--model", "m"], capsys)
    assert err.startswith("alignx eval: error: the following arguments are required: --benchmark, --out")
    assert _usage_error(["bogus"], capsys).startswith(
        "alignx: error: argument COMMAND: invalid choice: 'bogus'"
    )
    assert _usage_error([], capsys).startswith("alignx: error: the following arguments are required: COMMAND")
    err = _usage_error(["data", "bogus"], capsys)
    assert err.startswith("alignx data: error: argument DATA_COMMAND: invalid choice: 'bogus'")
    err = _usage_error(["data", "check", "p", "--kind", "x"], capsys)
    assert err.startswith("alignx data check: error: argument --kind: invalid choice: 'x'")
    err = _usage_error(["generate", "--model", "m", "--prompt", "p", "--top-k", "x"], capsys)
    assert (
        err == "alignx generate: error: argument --top-k: invalid int value: 'x' (see alignx generate --help)"
    )


@pytest.mark.parametrize(
    "command, rest",
    [
        ("data split", ["d.json", "--out", "o"]),
        ("data contrast", ["d.json", "--out", "o.json"]),
        ("synth", ["--out", "o"]),
        ("demo", ["--out", "o"]),
    ],
)
def test_a_negative_seed_is_a_usage_error(command, rest, capsys):
    """`--seed -1` was numpy's traceback (`expected non-negative integer`) once the rows were read."""
    argv, prog = [*command.split(), *rest], f"alignx {command}"
    err = _usage_error([*argv, "--seed", "-1"], capsys)
    assert (
        err == f"{prog}: error: argument --seed: must be a non-negative integer, got -1 (see {prog} --help)"
    )
    err = _usage_error([*argv, "--seed", "x"], capsys)
    assert err == f"{prog}: error: argument --seed: invalid int value: 'x' (see {prog} --help)"


@pytest.mark.parametrize("argv", [["--help"], ["eval", "--help"], ["data", "check", "--help"]])
def test_help_is_still_the_whole_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: alignx") and "options:" in out and out.count("\n") > 5


@pytest.mark.parametrize("command", [c for c in _commands() if c[0] not in ("train", "plan")], ids=" ".join)
def test_config_overrides_outside_train_and_plan_name_the_sub_command(command, capsys):
    """`--config.KEY=VALUE` given to another command was `alignx: error: ... (see alignx --help)`, naming no
    sub-command; it is a usage error of that sub-command, as an unknown flag is."""
    prog = "alignx " + " ".join(command)
    required = {
        "import": ["--hf", "h", "--out", "o"],
        "export": ["--checkpoint", "c", "--out", "o"],
        "eval": ["--model", "m", "--benchmark", "b=x", "--out", "o"],
        "generate": ["--model", "m"],
        "predict-preferences": ["--model", "m", "--persona", "p"],
        "synth": ["--out", "o", "--users", "2"],
        "demo": ["--out", "o"],
        "data check": ["p"],
        "data prepare": ["--source", "s", "--out", "o"],
        "data split": ["p", "--out", "o"],
        "data contrast": ["p", "--out", "o"],
    }[" ".join(command)]
    err = _usage_error([*command, *required, "--config.train.steps=3"], capsys)
    assert err == (
        f"{prog}: error: --config.* overrides only apply to train and plan, not {command[0]} (see {prog} --help)"
    ), err


@pytest.mark.parametrize(
    "argv",
    [
        ["import", "--hf", "H", "--out", "O"],
        ["data", "prepare", "--source", "SRC", "--out", "O"],
        ["synth", "--out", "O", "--users", "2"],
        ["data", "split", "P", "--out", "O"],
        ["data", "contrast", "P", "--out", "O.json"],
    ],
    ids=["import", "data prepare", "synth", "data split", "data contrast"],
)
def test_one_process_commands_refuse_a_multi_process_job(argv, monkeypatch, capsys, tmp_path):
    """Under launch/local.sh every process ran `import` (an orbax traceback: arrays of one host), `data
    prepare` (all but one refused by its lock) or synth, split and contrast (the same files written by every
    process at once): one line on each process instead, before anything is read."""
    monkeypatch.setenv("ALIGNX_COORDINATOR_ADDRESS", "127.0.0.1:1")  # a job that is never joined
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    name = " ".join(argv[:2] if argv[0] == "data" else argv[:1])
    assert len(err) == 1 and f"alignx {name} runs as one process" in err[0], err
    assert not list(tmp_path.iterdir())


# every path flag of every sub-command: (argv, the flag's dest, the value it holds with HOME=/h)
PATH_FLAGS = [
    (["import", "--hf=~/m", "--out=~/o"], {"hf": "/h/m", "out": "/h/o"}),
    (["import", "--gguf=~/m.gguf", "--out=o"], {"gguf": "/h/m.gguf", "out": "o"}),
    (
        ["export", "--checkpoint=~/c", "--out=~/o", "--results=~/r.json", "--results=r2.json"],
        {"checkpoint": "/h/c", "out": "/h/o", "results": ["/h/r.json", "r2.json"]},
    ),
    (["data", "check", "~/d.json"], {"path": "/h/d.json"}),
    (["data", "prepare", "--source=~/s", "--out=~/o"], {"source": "/h/s", "out": "/h/o"}),
    (["data", "split", "~/d.json", "--out=~/o"], {"path": "/h/d.json", "out": "/h/o"}),
    (["data", "contrast", "~/d.json", "--out=~/o.json"], {"path": "/h/d.json", "out": "/h/o.json"}),
    (["synth", "--out=~/o"], {"out": "/h/o"}),
    (["train", "--config=~/c.py"], {"config_path": "/h/c.py"}),
    (["plan", "--config=~/c.py", "--json=~/p.json"], {"config_path": "/h/c.py", "json": "/h/p.json"}),
    (
        [
            "eval",
            "--model=~/m",
            "--reference=~/r",
            "--benchmark=p-soups=~/b.json",
            "--benchmark=alignx=gs://b/~/x",
            "--reference-scores=~/s.jsonl",
            "--per-example=~/e.jsonl",
            "--out=~/o.json",
        ],
        {
            "model": "/h/m",
            "reference": "/h/r",
            "benchmark": ["p-soups=/h/b.json", "alignx=gs://b/~/x"],
            "reference_scores": "/h/s.jsonl",
            "per_example": "/h/e.jsonl",
            "out": "/h/o.json",
        },
    ),
    (
        ["generate", "--model=~/m", "--benchmark=prism=~/b", "--out=~/o.jsonl", "--persona=~/p.json"],
        {"model": "/h/m", "benchmark": "prism=/h/b", "out": "/h/o.jsonl", "persona": "/h/p.json"},
    ),
    (
        ["predict-preferences", "--model=~/m", "--data=~/d", "--out=~/o.jsonl"],
        {"model": "/h/m", "data": "/h/d", "out": "/h/o.jsonl"},
    ),
    (
        ["predict-preferences", "--model=org/m", "--persona=~/p.json"],
        {"model": "org/m", "persona": "/h/p.json"},
    ),
    (
        ["demo", "--out=~/o", "--model=~/m", "--p-soups=~/p.json"],
        {"out": "/h/o", "model": "/h/m", "p_soups": "/h/p.json"},
    ),
    (["eval", "--model=gs://b/m", "--benchmark=alignx=a~", "--out=o~"], {"model": "gs://b/m", "out": "o~"}),
]


@pytest.mark.parametrize(
    "argv, held", PATH_FLAGS, ids=lambda v: " ".join(v[:2]) if isinstance(v, list) else ""
)
def test_every_path_flag_expands_a_home_tilde(argv, held, monkeypatch):
    """`--out=~/x`: bash leaves a `~` after `=` as written, and a command made a `./~/x` folder (or found
    "no such file"); every path flag expands it as the shell would (`~user` too), URLs and hub ids stay."""
    monkeypatch.setenv("HOME", "/h")
    args = build_parser().parse_args(argv)
    assert {k: getattr(args, k) for k in held} == held
    root_home = os.path.expanduser("~root")  # a `~user` every system knows
    assert build_parser().parse_args(["synth", "--out=~root/x"]).out == os.path.join(root_home, "x")
    assert not root_home.startswith("~")


def test_an_out_under_a_home_tilde_is_written_in_that_home(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert main(["synth", "--out=~/w", "--users", "2", "--pairs-per-user", "1"]) == 0
    assert (home / "w" / "data.parquet").is_file() and not (tmp_path / "~").exists()
    capsys.readouterr()
