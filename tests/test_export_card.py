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
    (work / "checkpoints" / "5" / "meta").mkdir()  # a saved step's meta (no checksums: an older one's)
    (work / "checkpoints" / "5" / "meta" / "metadata").write_text("{}")
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
    assert "- Base model: `meta-llama/Llama-3.1-8B-Instruct@main`" in text  # the revision trained on
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


# ----------------------------------------------------------------------------- what an export may not carry


def test_float16_overflow_is_an_error_not_a_saved_inf(tiny_hf_checkpoints, tmp_path):
    """A weight past float16's 65504 would be saved as inf (and refused by eval later): one error now."""
    import jax.numpy as jnp

    from alignx_jax.errors import CheckpointError

    model = hf_lib.load_pretrained(tiny_hf_checkpoints["llama"])
    kernel = model.layers.mlp.down_proj.kernel
    kernel.set_value(kernel.get_value().at[0, 0, 0].set(1e6))
    with pytest.raises(
        CheckpointError, match=r"down_proj\.weight: holds values too large for float16.*1e\+06"
    ):
        hf_lib.save_hf(model, str(tmp_path / "f16"), dtype="float16")
    hf_lib.save_hf(model, str(tmp_path / "bf16"), dtype="bfloat16")  # bfloat16 holds it
    assert (
        float(jnp.max(hf_lib.load_pretrained(str(tmp_path / "bf16")).layers.mlp.down_proj.kernel.get_value()))
        > 9e5
    )


def test_a_nan_preference_head_is_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    from alignx_jax.errors import CheckpointError
    from alignx_jax.models import preference_head as ph

    cfg = ph.HeadConfig(embed_dim=16)
    ph.save_head(ph.PreferenceHead(cfg, rngs=__import__("flax").nnx.Rngs(0)), cfg, str(tmp_path))
    path = str(tmp_path / ph.HEAD_WEIGHTS_FILE)
    tensors = load_file(path)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].copy()
    tensors[key].flat[0] = float("nan")
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=rf"{key} holds NaN/inf values"):
        ph.load_head(str(tmp_path))


def test_a_second_import_replaces_the_first_ones_tokenizer_files(tiny_hf_checkpoints, tmp_path):
    """A re-import into an earlier import's folder: no stale chat_template.jinja of the first tokenizer."""
    ckpt = tmp_path / "ckpt"
    first = tmp_path / "first"
    shutil.copytree(tiny_hf_checkpoints["llama"], first)
    (first / "chat_template.jinja").write_text("{{ 'stale' }}")
    assert main(["import", "--hf", str(first), "--out", str(ckpt)]) == 0
    assert (ckpt / "chat_template.jinja").is_file()
    assert main(["import", "--hf", tiny_hf_checkpoints["llama"], "--out", str(ckpt)]) == 0
    assert not (ckpt / "chat_template.jinja").exists()
    own = json.loads((ckpt / "alignx_base.json").read_text())
    assert own["base_model"] == os.path.abspath(tiny_hf_checkpoints["llama"])


def test_an_import_of_an_export_records_the_exports_base_not_the_folder(tiny_hf_checkpoints, tmp_path):
    """`alignx import --hf EXPORT` recorded the export folder as its base, so the next export's card named that
    folder: the export's manifest records the base its card names, and the import carries it through (the
    folder kept as `export_folder`). An export written before the manifest recorded it: its card's hub id."""
    from huggingface_hub import ModelCard

    base = _base(tiny_hf_checkpoints["llama"], tmp_path / "base")
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    assert main(["import", "--hf", base, "--out", str(ckpt)]) == 0
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    assert hf_lib.read_export_manifest(str(out))["base_model"] == base
    again, out2 = tmp_path / "again", tmp_path / "out2"
    assert main(["import", "--hf", str(out), "--out", str(again)]) == 0
    info = json.loads((again / "alignx_base.json").read_text())
    assert info["base_model"] == base and info["export_folder"] == str(out) and info["license"] == "llama3.1"
    assert main(["export", "--checkpoint", str(again), "--out", str(out2)]) == 0
    text = ModelCard.load(str(out2 / "README.md")).text
    assert f"- Base model: `{base}`" in text and str(out) + "`" not in text
    # an older export: no base in its manifest, a hub id in its card's front matter (less its revision)
    old = tmp_path / "old"
    shutil.copytree(tiny_hf_checkpoints["llama"], old)
    (old / "alignx_export.json").write_text(json.dumps({"files": []}))
    (old / "README.md").write_text("---\nlicense: mit\nbase_model: org/name\n---\n# old\n")
    assert main(["import", "--hf", str(old), "--out", str(tmp_path / "from_old")]) == 0
    info = json.loads((tmp_path / "from_old" / "alignx_base.json").read_text())
    assert info == {"base_model": "org/name", "license": "mit", "export_folder": str(old)}
    # an export that records no base (nor does its card): the folder stays the base, as before
    (old / "README.md").write_text("# old\n")
    assert main(["import", "--hf", str(old), "--out", str(tmp_path / "bare")]) == 0
    info = json.loads((tmp_path / "bare" / "alignx_base.json").read_text())
    assert info == {"base_model": str(old), "license": None}


def test_import_refuses_its_own_folder_and_a_workdir(tiny_hf_checkpoints, tmp_path, capsys):
    mine = tmp_path / "mine"
    shutil.copytree(tiny_hf_checkpoints["llama"], mine)
    before = sorted(os.listdir(mine))
    assert main(["import", "--hf", str(mine), "--out", str(mine), "--overwrite"]) == 1
    assert "is the --hf folder itself" in capsys.readouterr().err and sorted(os.listdir(mine)) == before
    work = tmp_path / "W"
    (work / "checkpoints").mkdir(parents=True)
    (work / "config.json").write_text(json.dumps({"model": {}, "data": {}}))
    assert main(["import", "--hf", str(work), "--out", str(tmp_path / "x")]) == 1
    assert "a training workdir, not an HF folder; `alignx export" in capsys.readouterr().err


def test_export_through_a_link_keeps_the_link_and_the_folder_mode(tiny_hf_checkpoints, tmp_path):
    ckpt, real, link = tmp_path / "ckpt", tmp_path / "exports", tmp_path / "link"
    assert main(["import", "--hf", tiny_hf_checkpoints["llama"], "--out", str(ckpt)]) == 0
    real.mkdir(mode=0o700)
    os.chmod(real, 0o700)
    link.symlink_to(real)
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(link)]) == 0
    assert link.is_symlink() and (real / "config.json").is_file()
    assert (os.stat(real).st_mode & 0o777) == 0o700
    assert not [p for p in tmp_path.iterdir() if ".export-" in p.name]


def test_peft_base_is_a_loadable_base(tmp_path):
    """adapter_config.json's base: a hub id as recorded, an HF folder made absolute, and for anything
    transformers cannot load (an `alignx import` checkpoint) the run's own W/reference."""
    from types import SimpleNamespace

    from alignx_jax.export import peft_base

    work = tmp_path / "W"
    (work / "reference").mkdir(parents=True)
    res = SimpleNamespace(config_dir=str(work / "reference"))

    def recorded(base):
        (work / "reference" / "alignx_base.json").write_text(json.dumps({"base_model": base}))
        return peft_base(str(work), res)

    # a hub id keeps its revision (adapter_config.json's `revision`): the base's main moves on
    assert recorded("HuggingFaceTB/SmolLM2-135M-Instruct@v1") == ("HuggingFaceTB/SmolLM2-135M-Instruct", "v1")
    assert recorded("HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", None)
    hf_folder = tmp_path / "hf"
    hf_folder.mkdir()
    (hf_folder / "config.json").write_text("{}")
    (hf_folder / "model.safetensors").write_bytes(b"")
    assert recorded(str(hf_folder)) == (str(hf_folder), None)
    imported = tmp_path / "imported"
    (imported / "params").mkdir(parents=True)
    (imported / "config.json").write_text("{}")
    assert recorded(str(imported)) == (str(work / "reference"), None)


def test_card_lists_per_persona_results():
    from alignx_jax.model_card import _results_lines

    stats = {"accuracy": 0.5, "n": 4, "ci95": [0.2, 0.8]}
    lines = _results_lines(
        [("/r/a.json", {"method": "pba", "benchmarks": {"alignx": {"ugc": stats, "p": stats}}})]
    )
    assert "| a.json | pba | alignx/p | 50.0 | 4 | [20.0, 80.0] |" in lines
    assert "| a.json | pba | alignx/ugc | 50.0 | 4 | [20.0, 80.0] |" in lines


def test_overwrite_refuses_another_tokenizers_files_and_keeps_the_users(
    tiny_hf_checkpoints, tmp_path, capsys
):
    """`--overwrite` into a folder holding another tokenizer's chat_template.jinja / special_tokens_map.json:
    kept beside the export's tokenizer they made transformers load another chat template and eos. Where the
    export writes no tokenizer, tokenizer files copied in by the user are theirs and stay."""
    from transformers import AutoTokenizer

    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    assert main(["import", "--hf", tiny_hf_checkpoints["llama"], "--out", str(ckpt)]) == 0
    out.mkdir()
    (out / "chat_template.jinja").write_text("{{ 'another template' }}")
    (out / "special_tokens_map.json").write_text('{"eos_token": "<|end_of_text|>"}')
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--overwrite"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "chat_template.jinja, special_tokens_map.json" in err, err
    assert sorted(os.listdir(out)) == ["chat_template.jinja", "special_tokens_map.json"]
    (out / "chat_template.jinja").unlink()
    (out / "special_tokens_map.json").unlink()
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--overwrite"]) == 0
    want = AutoTokenizer.from_pretrained(tiny_hf_checkpoints["llama"])
    got = AutoTokenizer.from_pretrained(str(out))
    assert (got.chat_template, got.eos_token) == (want.chat_template, want.eos_token)

    # a checkpoint without a tokenizer: the user's copied-in tokenizer files stay through a re-export
    bare_src, bare, bare_out = tmp_path / "bare_src", tmp_path / "bare", tmp_path / "bare_out"
    shutil.copytree(tiny_hf_checkpoints["qwen2"], bare_src)
    for name in hf_lib.TOKENIZER_FILES:
        if (bare_src / name).exists():
            (bare_src / name).unlink()
    assert main(["import", "--hf", str(bare_src), "--out", str(bare)]) == 0
    assert main(["export", "--checkpoint", str(bare), "--out", str(bare_out)]) == 0
    for name in os.listdir(tiny_hf_checkpoints["qwen2"]):
        if name in hf_lib.TOKENIZER_FILES:
            shutil.copyfile(os.path.join(tiny_hf_checkpoints["qwen2"], name), bare_out / name)
    assert main(["export", "--checkpoint", str(bare), "--out", str(bare_out)]) == 0
    assert AutoTokenizer.from_pretrained(str(bare_out)).eos_token == want.eos_token


def test_card_leaves_out_found_results_of_another_step_or_model(tiny_hf_checkpoints, tmp_path):
    """Results files found in the workdir that scored another step's export or another model (W/reference,
    itself an export of another source) are not this export's numbers: the card leaves them out; a file
    scoring this step's export, or naming no model folder it can check, stays."""
    src = tiny_hf_checkpoints["qwen2"]
    work = tmp_path / "W"
    shutil.copytree(src, work / "reference")
    hf_lib.write_export_manifest(str(work / "reference"), [], source="Qwen/Qwen2.5-0.5B", step=None)
    checkpoint_lib.save_checkpoint(hf_lib.load_pretrained(src), str(tmp_path / "tmp"))
    for step in (2, 5):
        os.makedirs(work / "checkpoints" / str(step) / "meta")
        (work / "checkpoints" / str(step) / "meta" / "metadata").write_text("{}")
        shutil.copytree(tmp_path / "tmp" / "params", work / "checkpoints" / str(step) / "params")
    run_cfg = {"model": {}, "data": {"method": "ica"}, "loss": {}, "optim": {}, "train": {}}
    (work / "config.json").write_text(json.dumps(run_cfg))
    os.makedirs(work / "eval")
    for step in (2, 5):
        (tmp_path / f"hf{step}").mkdir()
        hf_lib.write_export_manifest(str(tmp_path / f"hf{step}"), [], source=str(work), step=step)
    scored = {"step5": tmp_path / "hf5", "step2": tmp_path / "hf2", "base": work / "reference"}
    for name, model in scored.items():
        data = json.loads(open(_results(work / "eval" / f"{name}.json")).read())
        (work / "eval" / f"{name}.json").write_text(json.dumps({**data, "model": str(model)}))
    _results(work / "eval" / "older.json")  # a results file recording no model: kept
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(work), "--out", str(out)]) == 0
    text = (out / "README.md").read_text()
    assert "(step 5)" in text and "| step5.json |" in text and "| older.json |" in text
    assert "step2.json" not in text and "base.json" not in text
    # --step 2: that step's results, not the latest's
    assert main(["export", "--checkpoint", str(work), "--out", str(out), "--step", "2"]) == 0
    text = (out / "README.md").read_text()
    assert "(step 2)" in text and "| step2.json |" in text and "step5.json" not in text


def _card(run_cfg, *, step=7, base_model=None) -> str:
    from alignx_jax.model_card import build_card

    return build_card(
        name="out",
        source="/w",
        step=step,
        base_model=base_model,
        license_=None,
        run_cfg=run_cfg,
        results=[],
        dtype="float32",
        has_head=False,
    )


def _run_cfg(**sections) -> dict:
    cfg = {"model": {"hf_path": "org/base"}, "data": {"method": "ica"}, "loss": {}, "optim": {}, "train": {}}
    for key, value in sections.items():
        cfg[key] = {**cfg[key], **value}
    return cfg


def _settings(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("- Training settings: "))


def test_card_of_a_lora_run_names_its_adapters():
    """The export of a model.lora run is the base with the adapters merged in: the card says so, with the
    rank, alpha (0: 2 * rank) and target modules; a run without LoRA says nothing of it."""
    lora = {"rank": 8, "alpha": 32.0, "targets": ["q_proj", "v_proj"]}
    text = _card(_run_cfg(model={"lora": lora}), base_model="org/base")
    assert "LoRA rank 8, LoRA alpha 32, LoRA target modules q_proj/v_proj" in _settings(text)
    assert "LoRA adapters merged into the base model's" in text and "--peft" in text
    text = _card(_run_cfg(model={"lora": {"rank": 4, "alpha": 0.0, "targets": "o_proj"}}))
    assert "LoRA rank 4, LoRA alpha 8, LoRA target modules o_proj" in _settings(text)
    text = _card(_run_cfg(model={"lora": {"rank": 0, "alpha": 0.0, "targets": ["q_proj"]}}))
    assert "LoRA" not in text


def test_card_of_an_epochs_driven_run_gives_the_steps_it_ran():
    """train.steps -1 (as many steps as train.epochs take) is the checkpoint's step on the card, not
    "steps -1"; a fixed train.steps leaves out train.epochs, which such a run does not read."""
    text = _settings(_card(_run_cfg(train={"steps": -1, "epochs": 2}), step=12))
    assert "steps 12 (set by epochs), epochs 2" in text and "-1" not in text
    text = _settings(_card(_run_cfg(train={"steps": 300, "epochs": 1}), step=300))
    assert "steps 300" in text and "epochs" not in text


def test_card_of_a_scratch_run_says_it_was_randomly_initialised():
    """A run with no model.hf_path (model.init) has no base model: "randomly initialised", not
    "unknown"; a model checkpoint that recorded no base stays unknown."""
    scratch = _run_cfg(model={"hf_path": "", "init": {"enabled": True}})
    assert "- Base model: none: randomly initialised (`model.init`)" in _card(scratch)
    assert "- Base model: unknown" in _card(None)


def test_card_says_which_generation_config_the_export_holds(tmp_path):
    """The card's generation_config.json sentence is true of the file written: the base model's kept as
    it is, or the token ids alone where there was none to keep (a run from scratch, a base without one)."""
    from alignx_jax.model_card import write_card

    texts = {}
    for kind, gen in (("base", BASE_GEN), ("ids", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})):
        out = tmp_path / kind
        out.mkdir()
        (out / "generation_config.json").write_text(json.dumps(gen))
        write_card(
            str(out),
            checkpoint=str(tmp_path),
            config_dir=str(tmp_path),
            source="s",
            step=None,
            dtype="float32",
            has_head=False,
        )
        texts[kind] = (out / "README.md").read_text()
    assert "`generation_config.json` is the base model's, unchanged" in texts["base"]
    assert "`generation_config.json` holds only the token ids (bos, eos, pad)" in texts["ids"]
    assert "base model's, unchanged" not in texts["ids"]
