"""The docs' command lines and config keys are the code's (README.md, docs/*.md).

Every `--flag` an `alignx SUB ...` command line of the docs gives is one of that sub-command's flags, and a
value list it gives a flag with choices (`--method none|ica|pba`) names only those choices; every
`--config.KEY` and every backticked `section.key[=value]` is a config key (and a `Literal` key's value one of
its values). The other way round, README names every sub-command, every flag and every config key."""

from __future__ import annotations

import ast
import dataclasses
import glob
import os
import re
import typing

import pytest

from alignx_jax import config_schema
from alignx_jax.cli import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
# ARCHITECTURE.md's backticked `train.step`, `batch.to_microbatches` name modules, not config keys
KEY_DOCS = [d for d in DOCS if not d.endswith("ARCHITECTURE.md")]
SECTIONS = ("model", "data", "loss", "optim", "train", "mesh", "sharding", "checkpoint", "pba", "plan")

FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
ALTERNATIVES = re.compile(r"\\?\|")  # `a|b`, in a table `a\|b`
# `alignx eval|generate --model ...` to the end of its code span or line (continuation lines joined first)
COMMAND = re.compile(r"alignx ((?:data\s)?[a-z][a-z-]*(?:\\?\|[a-z][a-z-]*)*)([^`\n]*)")
CONFIG_FLAG = re.compile(r"--config\.([a-z_][a-z0-9_.]*[a-z0-9_])(?:=([\w.\-]+(?:\\?\|[\w.\-]+)*))?")
BACKTICKED_KEY = re.compile(r"`([a-z_]+(?:\.[a-z0-9_]+)+)(?:=([\w.\-]+(?:\\?\|[\w.\-]+)*))?")
# "`loss.type` sigmoid|cdpo|...", "`overflow` truncate|drop", "`dtype` compute float32|...|auto"
KEY_VALUES = re.compile(r"`([a-z_.]+)`(?: [a-z ]+?)? ([a-z0-9_]+(?:\\?\|[a-z0-9_]+)+)")


def _read(doc: str) -> str:
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        return f.read().replace("\\\n", " ")  # a shell command's continuation lines are one command


def _sub_commands() -> dict[str, object]:
    """'import', ..., 'data check', ... -> its argparse parser."""
    out = {}
    for name, p in build_parser().commands.choices.items():
        subs = getattr(p, "commands", None)
        if subs is None:
            out[name] = p
        else:
            out.update({f"{name} {sub}": q for sub, q in subs.choices.items()})
    return out


COMMANDS = _sub_commands()


def _flags(parser) -> dict[str, object]:
    return {o: a for a in parser._actions for o in a.option_strings}


def _config_fields(cls: type = config_schema.RunConfig, prefix: str = "") -> dict[str, object]:
    """Every config key ('model.lora.rank') -> its schema type."""
    out = {}
    for key, typ in config_schema.section_fields(cls):
        if dataclasses.is_dataclass(typ):
            out.update(_config_fields(typ, f"{prefix}{key}."))
        else:
            out[prefix + key] = typ
    return out


FIELDS = _config_fields()
SUB_SECTIONS = {k.rsplit(".", 1)[0] for k in FIELDS if k.count(".") > 1}  # 'model.lora', 'model.init'


def _literal(key: str) -> set | None:
    typ = FIELDS[key]
    return set(typing.get_args(typ)) if typing.get_origin(typ) is typing.Literal else None


def _commands_of(doc: str):
    """(sub-command names, the text after them) of each `alignx ...` command line of a doc, and of each
    flag the commands table row gives its command outside that code span (`--overwrite`: ...)."""
    text = _read(doc)
    for m in COMMAND.finditer(text):
        first, *others = ALTERNATIVES.split(" ".join(m.group(1).split()))  # `alignx data\ncheck` wraps
        prefix = "data " if first.startswith("data ") else ""
        yield [first, *(prefix + o for o in others)], m.group(2)
    for line in text.splitlines():
        row = re.match(r"\| `alignx ((?:data )?[a-z][a-z-]*)", line)
        if row:  # the row's own flags only: a span such as `data split --by row` is another command's
            yield (
                [row.group(1)],
                " ".join(span for span in re.findall(r"`([^`]*)`", line) if span.startswith("--")),
            )


@pytest.mark.parametrize("doc", DOCS)
def test_every_documented_command_line_uses_flags_and_choices_the_command_has(doc):
    found, wrong = 0, []
    for names, rest in _commands_of(doc):
        for name in names:
            if name not in COMMANDS:
                wrong.append(f"alignx {name}: no such sub-command")
                continue
            found += 1
            flags = _flags(COMMANDS[name])
            for m in re.finditer(
                r"(?<![\w-])(--[a-z][a-z0-9-]*)(?:[ =]([\w.][\w.\-]*(?:\\?\|[\w.][\w.\-]*)+))?", rest
            ):
                flag, values = m.groups()
                if flag.startswith("--config"):
                    continue
                if flag not in flags:
                    wrong.append(f"alignx {name}: no flag {flag}")
                elif values and flags[flag].choices is not None:
                    bad = [v for v in ALTERNATIVES.split(values) if v not in flags[flag].choices]
                    if bad:
                        wrong.append(f"alignx {name} {flag}: {bad} not among {list(flags[flag].choices)}")
    assert not wrong, f"{doc}: {wrong}"
    if doc == "README.md":
        assert found > 40, found  # the commands table alone has a line per sub-command: the pattern reads it


@pytest.mark.parametrize("doc", DOCS)
def test_every_documented_config_override_is_a_config_key(doc):
    wrong = []
    for m in CONFIG_FLAG.finditer(_read(doc)):
        key, values = m.groups()
        if key not in FIELDS:
            wrong.append(f"--config.{key}: no such key")
        elif values and _literal(key) is not None:
            wrong += [
                f"--config.{key}={v}: not one of {_literal(key)}"
                for v in ALTERNATIVES.split(values)
                if v not in _literal(key)
            ]
    assert not wrong, f"{doc}: {wrong}"


@pytest.mark.parametrize("doc", KEY_DOCS)
def test_every_backticked_config_key_and_value_exists(doc):
    text = _read(doc)
    wrong, found = [], 0
    for m in BACKTICKED_KEY.finditer(text):
        key, values = m.groups()
        if key.split(".")[0] not in SECTIONS:
            continue
        found += 1
        if text[m.end(1)] == "*":  # `data.synth_*`: the keys of that prefix
            if not any(k.startswith(key) for k in FIELDS):
                wrong.append(f"`{key}*`: no such config keys")
        elif key not in FIELDS and key not in SUB_SECTIONS:
            wrong.append(f"`{key}`: no such config key")
        elif values and key in FIELDS and _literal(key) is not None:
            wrong += [
                f"`{key}={v}`: not one of {_literal(key)}"
                for v in ALTERNATIVES.split(values)
                if v not in _literal(key)
            ]
    leaves: dict[str, list[str]] = {}
    for key in FIELDS:
        leaves.setdefault(key.rsplit(".", 1)[-1], []).append(key)
    for m in KEY_VALUES.finditer(text):  # a key's documented values: all of some key of that name's
        named, values = m.group(1), set(ALTERNATIVES.split(m.group(2)))
        keys = [k for k in ([named] if named in FIELDS else leaves.get(named, [])) if _literal(k) is not None]
        if keys and not any(values <= _literal(k) for k in keys):
            wrong.append(f"`{named}` {sorted(values)}: not among {[sorted(_literal(k)) for k in keys]}")
    assert not wrong, f"{doc}: {wrong}"
    if doc == "README.md":
        assert found > 100, found


def test_readme_names_every_sub_command_flag_and_config_key():
    text = _read("README.md")
    missing = [f"alignx {name}" for name in COMMANDS if f"alignx {name}" not in text]
    missing += [
        f"alignx {name} {flag}"
        for name, parser in COMMANDS.items()
        for flag in _flags(parser)
        if flag.startswith("--") and flag != "--help" and not re.search(re.escape(flag) + r"(?![\w-])", text)
    ]
    # a key is named in full (`loss.beta`) or by its name in its section's list (`beta`)
    missing += [k for k in FIELDS if k not in text and f"`{k.rsplit('.', 1)[-1]}`" not in text]
    assert not missing, missing


PACKAGE = os.path.join(ROOT, "alignx_jax")
FILE_SUFFIXES = ("json", "jsonl", "lock", "bad", "safetensors", "npy", "toml", "md", "png")


def _module_names() -> dict[str, set[str]]:
    """Each module of the package ('data.batching'; a package by its folder) -> its top-level names and
    its classes' `Class.method` / `Class.field` names."""
    out = {}
    for path in glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True):
        module = os.path.relpath(path, PACKAGE)[: -len(".py")].replace(os.sep, ".")
        module = module.removesuffix("__init__").rstrip(".")
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        names = set()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
                for inner in node.body if isinstance(node, ast.ClassDef) else ():
                    if isinstance(inner, ast.FunctionDef):
                        names.add(f"{node.name}.{inner.name}")
                    elif isinstance(inner, ast.AnnAssign) and isinstance(inner.target, ast.Name):
                        names.add(f"{node.name}.{inner.target.id}")
            elif isinstance(node, ast.Assign):
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
            elif isinstance(node, ast.ImportFrom):  # a re-export
                names.update(a.asname or a.name for a in node.names)
        out[module] = names
    return out


def _architecture_tree() -> list[str]:
    """The module paths ('models/config.py', 'evaluate/') of ARCHITECTURE.md's `alignx_jax/` tree."""
    text = _read("docs/ARCHITECTURE.md")
    block = text[text.index("```\nalignx_jax/") + 4 :]
    listed, stack = [], []
    for line in block[: block.index("\n```")].splitlines()[1:]:
        m = re.match(r"( +)(\S+)", line)
        if m and len(m.group(1)) <= 4 and m.group(2).endswith((".py", "/")):  # deeper: a description
            stack = [*stack[: (len(m.group(1)) - 2) // 2], m.group(2)]
            listed.append("".join(stack))
    return listed


def test_architecture_lists_every_module_and_only_those():
    listed = _architecture_tree()
    modules = {
        os.path.relpath(p, PACKAGE)
        for p in glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True)
        if not p.endswith("__init__.py")
    }
    assert [p for p in listed if not os.path.exists(os.path.join(PACKAGE, p))] == []
    assert sorted(modules - set(listed)) == []


@pytest.mark.parametrize("doc", ["docs/ARCHITECTURE.md", "README.md"])
def test_the_code_names_the_docs_give_exist(doc):
    """`paths.tmp_path`, `train.step.model_pair_logps`, `models/presets.py:resolve_model_path`: a module of
    the package (by its path or the tail of it) and a name it defines; a `dir/file.py` a file of the
    checkout. README's are its `alignx_jax.`-spelled names and its `dir/file.py` paths."""
    modules = _module_names()
    wrong, found = [], 0
    for m in re.finditer(
        r"`((?:alignx_jax\.)?[a-z_]+(?:[./][a-z_0-9]+)*(?:\.py:|\.)[A-Za-z_][\w.]*)", _read(doc)
    ):
        ref = m.group(1).rstrip(".")
        if (
            doc == "README.md"
            and not ref.startswith("alignx_jax.")
            and not re.fullmatch(r"[\w/]+/\w+\.py", ref)
        ):
            continue  # README's `data.train` is a config key, `tokenizer.ggml.model` a GGUF field
        if ref.endswith(".py"):
            found += 1
            if not any(os.path.exists(os.path.join(d, ref)) for d in (ROOT, PACKAGE)):
                wrong.append(f"`{ref}`: no such file")
            continue
        if ref.rsplit(".", 1)[-1] in FILE_SUFFIXES or ref in FIELDS or ref in SUB_SECTIONS:
            continue
        parts = ref.removeprefix("alignx_jax.").replace(".py:", ".").replace("/", ".").split(".")
        for i in range(len(parts), 0, -1):  # the longest leading part that names a module
            head, rest = ".".join(parts[:i]), ".".join(parts[i:])
            owners = [mod for mod in modules if mod == head or mod.endswith("." + head)]
            if owners:
                found += 1
                if rest and not any(rest in modules[mod] for mod in owners):
                    wrong.append(f"`{ref}`: {owners} define no {rest}")
                break
    assert not wrong, f"{doc}: {wrong}"
    assert found > 20, found


def test_the_hub_id_section_names_every_model_flag():
    """README's hub-id list names each command flag that resolves a model (`resolve_model_path`), and
    `alignx plan`, which reads a hub id's config.json for `model.hf_path`."""
    text = _read("README.md")
    section = " ".join(text[text.index("### Hub ids") :].split("\n\n", 2)[1].split())
    spans = re.findall(r"`alignx ([a-z-]+)([^`]*)`", section)
    missing = [
        f"alignx {name} {flag}"
        for name, parser in COMMANDS.items()
        for flag in _flags(parser)
        if flag in ("--model", "--reference", "--hf")
        and not any(cmd == name and re.search(re.escape(flag) + r"(?![\w-])", rest) for cmd, rest in spans)
    ]
    if "`alignx plan`'s `model.hf_path`" not in section:
        missing.append("alignx plan model.hf_path")
    assert not missing, missing
