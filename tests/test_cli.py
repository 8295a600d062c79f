"""The command line's usage errors: one line on stderr naming the sub-command, exit status 2 (README)."""

from __future__ import annotations

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
