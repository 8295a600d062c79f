"""`alignx export` as a Hugging Face user meets it: the base model's generation_config.json unchanged,
config.json's dtype matching the saved tensors, a README.md model card.

Independent references: transformers (`AutoModelForCausalLM.from_pretrained(..., dtype="auto")`,
`GenerationConfig.from_pretrained`) loading the export, the safetensors file headers, and
huggingface_hub's `ModelCard` parsing the card's front matter.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from alignx_jax.cli import main
from alignx_jax.models import checkpoint as checkpoint_lib
from alignx_jax.models import hf as hf_lib
from alignx_jax.models.safetensors_io import SafetensorsReader

BASE_GEN = {
    "bos_token_id": 1,
    "do_sample": True,
    "eos_token_id": [2, 3],
    "temperature": 0.6,
    "top_p": 0.9,
    "transformers_version": "4.43.0",
}
BASE_CARD = "---\nlicense: llama3.1\nlanguage:\n- en\n---\n# Base\n"


def _base(src: str, dst) -> str:
    """A copy of the tiny HF model with a base-model generation_config.json and a card with a license."""
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "generation_config.json"), "w") as f:
        json.dump(BASE_GEN, f, indent=1)
    with open(os.path.join(dst, "README.md"), "w") as f:
        f.write(BASE_CARD)
    return str(dst)


def _tensor_dtypes(folder: str) -> set[str]:
    r = SafetensorsReader(folder)
    return {str(r.get(n).dtype) for n in r.entries}


def _results(path, accuracy=0.75, method="ica") -> str:
    data = {
        "method": method,
        "benchmarks": {"p-soups": {"accuracy": accuracy, "n": 40, "ci95": [0.6, 0.86]}},
    }
    with open(path, "w") as f:
        json.dump(data, f)
    return str(path)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_export_keeps_base_generation_config_and_dtype(tiny_hf_checkpoints, tmp_path, dtype):
    base = _base(tiny_hf_checkpoints["llama"], tmp_path / "base")
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    assert main(["import", "--hf", base, "--out", str(ckpt)]) == 0
    results = _results(tmp_path / "r.json")
    argv = ["export", "--checkpoint", str(ckpt), "--out", str(out), "--dtype", dtype, "--results", results]
    assert main(argv) == 0
    # generation_config.json: the base's, byte for byte (no sampling settings written into it)
    with (
        open(os.path.join(base, "generation_config.json"), "rb") as a,
        open(out / "generation_config.json", "rb") as b,
    ):
        assert a.read() == b.read()
    cfg = json.loads((out / "config.json").read_text())
    assert _tensor_dtypes(str(out)) == {dtype} and cfg["dtype"] == dtype
    assert "torch_dtype" not in cfg or cfg["torch_dtype"] == dtype

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    m = AutoModelForCausalLM.from_pretrained(str(out), dtype="auto")
    assert m.model.embed_tokens.weight.dtype == getattr(torch, dtype)
    g = GenerationConfig.from_pretrained(str(out))
    assert g.temperature == 0.6 and g.top_p == 0.9 and g.top_k in (None, 50)  # the base's, not 0.9/10/0.95

    from huggingface_hub import ModelCard

    card = ModelCard.load(str(out / "README.md"))
    assert card.data.license == "llama3.1" and card.data.library_name == "transformers"
    text = card.text
    assert base in text and "temperature 0.9, top-k 10 and top-p 0.95" in text
    assert "| r.json | ica | p-soups | 75.0 | 40 | [60.0, 86.0] |" in text
    assert f"in {dtype} safetensors" in text
    manifest = hf_lib.read_export_manifest(str(out))
    assert "README.md" in manifest["files"] and "generation_config.json" in manifest["files"]


def test_export_without_base_generation_config_writes_token_ids_only(tiny_hf_checkpoints, tmp_path):
    model = hf_lib.load_pretrained(tiny_hf_checkpoints["qwen2"])
    hf_lib.save_hf(model, str(tmp_path / "out"))
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert set(gen) == {"bos_token_id", "eos_token_id", "pad_token_id"}
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["dtype"] == "float32" and _tensor_dtypes(str(tmp_path / "out")) == {"float32"}


def test_torch_dtype_of_an_older_base_config_is_rewritten(tiny_hf_checkpoints, tmp_path):
    base = _base(tiny_hf_checkpoints["qwen2"], tmp_path / "base")
    cfg = json.loads(open(os.path.join(base, "config.json")).read())
    cfg["torch_dtype"] = "bfloat16"  # as transformers 4.x wrote it: the export stores float32
    cfg.pop("dtype", None)
    with open(os.path.join(base, "config.json"), "w") as f:
        json.dump(cfg, f)
    model = hf_lib.load_pretrained(base)
    hf_lib.save_hf(model, str(tmp_path / "out"), base_dir=base)
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["dtype"] == out["torch_dtype"] == "float32"


def test_workdir_export_card(tiny_hf_checkpoints, tmp_path):
    """A training workdir trained from a hub id: the card names it, the method, the data, the settings
    and the eval results found in the workdir; the license comes from W/reference's card."""
    src = tiny_hf_checkpoints["llama"]
    work = tmp_path / "W"
    _base(src, work / "reference")
    m = hf_lib.load_pretrained(src)
    checkpoint_lib.save_checkpoint(m, str(tmp_path / "tmp"))
    os.makedirs(work / "checkpoints" / "5")
    shutil.move(str(tmp_path / "tmp" / "params"), str(work / "checkpoints" / "5" / "params"))
    run_cfg = {
        "workdir": str(work),
        "model": {"hf_path": "meta-llama/Llama-3.1-8B-Instruct@main"},
        "data": {"train": "/data/alignx/train", "method": "pba", "persona": "p", "max_length": 8192},
        "loss": {"type": "sigmoid", "beta": 0.1},
        "optim": {"lr": 5e-7},
        "train": {"global_batch": 128, "steps": -1, "epochs": 1},
    }
    (work / "config.json").write_text(json.dumps(run_cfg))
    os.makedirs(work / "eval")
    _results(work / "eval" / "pba.json", 0.681, "pba")
    (work / "eval" / "notes.json").write_text("{}")  # not a results file: ignored
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(work), "--out", str(out)]) == 0

    from huggingface_hub import ModelCard

    card = ModelCard.load(str(out / "README.md"))
    assert card.data.base_model == "meta-llama/Llama-3.1-8B-Instruct" and card.data.license == "llama3.1"
    assert "pba" in card.data.tags
    text = card.text
    assert "(step 5)" in text and "PBA" in text and "`/data/alignx/train`" in text
    assert "beta 0.1" in text and "learning rate 5e-07" in text and "global batch 128" in text
    assert "| pba.json | pba | p-soups | 68.1 | 40 |" in text and "notes.json" not in text
    with (
        open(work / "reference" / "generation_config.json", "rb") as a,
        open(out / "generation_config.json", "rb") as b,
    ):
        assert a.read() == b.read()


def test_bad_results_file_is_one_line(tiny_hf_checkpoints, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert main(["import", "--hf", tiny_hf_checkpoints["qwen2"], "--out", str(ckpt)]) == 0
    (tmp_path / "bad.json").write_text('{"accuracy": 1}')
    out = tmp_path / "out"
    argv = ["export", "--checkpoint", str(ckpt), "--out", str(out), "--results", str(tmp_path / "bad.json")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not an `alignx eval` results file" in err
    assert not out.exists() and not [e for e in os.listdir(tmp_path) if e.startswith(".out.")]
