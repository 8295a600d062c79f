"""HF <-> orbax checkpoints: bit-exact round trips, transformers loads our export, CLI errors."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

from alignx_jax.cli import main
from alignx_jax.errors import CheckpointError
from alignx_jax.models import checkpoint as checkpoint_lib
from alignx_jax.models import hf as hf_lib
from alignx_jax.models.checkpoint import load_checkpoint, resolve_checkpoint
from alignx_jax.models.hf import load_pretrained
from alignx_jax.models.safetensors_io import SafetensorsReader


def _bits(x):
    return np.ascontiguousarray(np.asarray(x)).view(np.uint8)


def _same_tensors(a_dir, b_dir):
    a, b = SafetensorsReader(a_dir), SafetensorsReader(b_dir)
    assert set(a.entries) == set(b.entries)
    for name in a.entries:
        x, y = a.get(name), b.get(name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert np.array_equal(_bits(x), _bits(y)), name


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_import_export_round_trip_is_bit_exact(tiny_hf_checkpoints, tmp_path, kind, capsys):
    src = tiny_hf_checkpoints[kind]
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    assert main(["import", "--hf", src, "--out", str(ckpt)]) == 0
    assert (
        (ckpt / "config.json").is_file()
        and (ckpt / "params").is_dir()
        and (ckpt / "tokenizer.json").is_file()
    )
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--shard-size", "400KB"]) == 0
    _same_tensors(src, str(out))
    with open(os.path.join(src, "config.json")) as f, open(out / "config.json") as g:
        assert json.load(f) == json.load(g)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # the shard size was honoured
    assert (out / "generation_config.json").is_file() and (out / "tokenizer_config.json").is_file()

    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = torch.arange(6, 20)[None]
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_bfloat16_export_and_reimport(tiny_hf_checkpoints, tmp_path):
    src = tiny_hf_checkpoints["qwen2"]
    model = load_pretrained(src)
    hf_lib.save_hf(model, str(tmp_path / "bf16"), dtype="bfloat16", tokenizer_dir=src)
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    again = load_pretrained(str(tmp_path / "bf16"), dtype="bfloat16")
    assert again.layers.attn.q_proj.kernel.get_value().dtype.name == "bfloat16"
    hf_lib.save_hf(again, str(tmp_path / "bf16b"))
    _same_tensors(str(tmp_path / "bf16"), str(tmp_path / "bf16b"))

    from transformers import AutoModelForCausalLM

    # "auto": the dtype the export declares (transformers 5 defaults to it, 4.x to float32)
    m = AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"), dtype="auto")
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16


def test_training_workdir_export_picks_latest_step(tiny_hf_checkpoints, tmp_path, capsys):
    src = tiny_hf_checkpoints["llama"]
    model = load_pretrained(src)
    work = tmp_path / "W"
    shutil.copytree(src, work / "reference")
    for step, scale in ((3, 1.0), (7, 2.0)):
        m = load_pretrained(src)
        m.norm.scale.set_value(m.norm.scale.get_value() * scale)
        checkpoint_lib.save_checkpoint(m, str(tmp_path / f"tmp{step}"))
        os.makedirs(work / "checkpoints" / str(step))
        shutil.move(str(tmp_path / f"tmp{step}" / "params"), str(work / "checkpoints" / str(step) / "params"))
        (
            work / "checkpoints" / str(step) / "meta"
        ).mkdir()  # a saved step's meta (an older one's: no checksums)
        (work / "checkpoints" / str(step) / "meta" / "metadata").write_text("{}")
    res = resolve_checkpoint(str(work))
    assert res.step == 7 and res.tokenizer_dir == str(work / "reference")
    latest = load_checkpoint(str(work))
    np.testing.assert_array_equal(latest.norm.scale.get_value(), 2.0 * model.norm.scale.get_value())
    assert main(["export", "--checkpoint", str(work), "--step", "3", "--out", str(tmp_path / "e3")]) == 0
    _same_tensors(src, str(tmp_path / "e3"))
    assert main(["export", "--checkpoint", str(work), "--step", "5", "--out", str(tmp_path / "e5")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no step 5" in err[0] and "3, 7" in err[0]


def test_export_refuses_an_out_that_is_or_holds_the_checkpoint(tiny_hf_checkpoints, tmp_path, capsys):
    """`--out W --overwrite` (or W's parent, or W/checkpoints) exported into the workdir being exported:
    its run config.json was replaced by the HF one and the whole folder renamed aside and rebuilt."""
    src = tiny_hf_checkpoints["llama"]
    work = tmp_path / "runs" / "W"
    shutil.copytree(src, work / "reference")
    checkpoint_lib.save_checkpoint(load_pretrained(src), str(tmp_path / "tmp"))
    os.makedirs(work / "checkpoints" / "3")
    shutil.move(str(tmp_path / "tmp" / "params"), str(work / "checkpoints" / "3" / "params"))
    (work / "checkpoints" / "3" / "meta").mkdir()  # a saved step's meta (no checksums: an older one's)
    (work / "checkpoints" / "3" / "meta" / "metadata").write_text("{}")
    (work / "config.json").write_text('{"model": {"hf_path": "run config"}}')
    before = sorted(os.listdir(work))
    for out, needle in (
        (work, "is the --checkpoint folder itself"),
        (tmp_path / "runs", "is or holds a folder of --checkpoint"),
        (work / "checkpoints", "is or holds a folder of --checkpoint"),
    ):
        assert main(["export", "--checkpoint", str(work), "--out", str(out), "--overwrite"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--out {os.path.realpath(out)}: {needle}" in err[0], err
    assert (work / "config.json").read_text() == '{"model": {"hf_path": "run config"}}'
    assert sorted(os.listdir(work)) == before and sorted(os.listdir(tmp_path / "runs")) == ["W"]
    ckpt = tmp_path / "ckpt"
    assert main(["import", "--hf", src, "--out", str(ckpt)]) == 0
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(ckpt / ".." / "ckpt"), "--overwrite"]) == 1
    assert "is the --checkpoint folder itself" in capsys.readouterr().err
    assert not (ckpt / "model.safetensors.index.json").exists()
    assert main(["export", "--checkpoint", str(work), "--out", str(work / "hf")]) == 0  # inside it: new


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _rewrite_without(folder, drop=None, reshape=None):
    """Rewrite the folder's single safetensors file without tensor `drop` / with `reshape` cut."""
    from safetensors.numpy import save_file

    path = os.path.join(folder, "model.safetensors")
    r = SafetensorsReader(folder)
    tensors = {n: np.array(r.get(n)) for n in r.entries if n != drop}
    if reshape:
        tensors[reshape] = tensors[reshape][:-1]
    del r
    save_file(tensors, path, metadata={"format": "pt"})


def test_load_decoder_config_names_the_folder_once(tmp_path):
    """`checkpoint folder not found: DIR` came back as `DIR: checkpoint folder not found: DIR` to callers
    that had not checked the folder first (train and plan); config.json's own problems name it once too."""
    folder = tmp_path / "m"
    at, config = re.escape(str(folder)), re.escape(str(folder / "config.json"))
    expected = [
        (None, f"^checkpoint folder not found: {at}$"),
        ("", f"^{at}: no config.json$"),
        ("{not json", f"^{config}: malformed config.json"),
        ('{"model_type": "gpt2"}', f"^{at}: unsupported model_type 'gpt2'"),
    ]
    for text, message in expected:
        if text is not None:
            folder.mkdir(exist_ok=True)
            if text:
                (folder / "config.json").write_text(text)
        with pytest.raises(CheckpointError, match=message) as e:
            hf_lib.load_decoder_config(str(folder))
        assert str(e.value).count(str(folder)) == 1, e.value


@pytest.mark.parametrize(
    "case,needle",
    [
        ("missing_folder", "not found"),
        ("no_config", "no config.json"),
        ("bad_json", "malformed config.json"),
        ("unsupported", "unsupported model_type 'gpt2'"),
        ("no_safetensors", "no *.safetensors"),
        ("bin_only", "no *.safetensors files (it holds pytorch_model.bin, transformers' older format"),
        ("missing_tensor", "missing tensor 'model.layers.1.mlp.up_proj.weight'"),
        ("wrong_shape", "model.norm.weight"),
    ],
)
def test_import_errors_exit_1_with_one_line(tiny_hf_checkpoints, tmp_path, capsys, case, needle):
    from transformers import AutoModelForCausalLM

    src = tiny_hf_checkpoints["qwen2"]
    folder = str(tmp_path / "bad")
    if case != "missing_folder":
        _copy(src, folder)
    if case == "no_config":
        os.remove(os.path.join(folder, "config.json"))
    elif case == "bad_json":
        with open(os.path.join(folder, "config.json"), "w") as f:
            f.write("{not json")
    elif case == "unsupported":
        cfg = json.load(open(os.path.join(folder, "config.json")))
        cfg["model_type"] = "gpt2"
        json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
    elif case in ("no_safetensors", "bin_only"):
        os.remove(os.path.join(folder, "model.safetensors"))
    if (
        case == "bin_only"
    ):  # what transformers < 4.35 saved: transformers loads it, import said only the above
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        torch.save(model.state_dict(), os.path.join(folder, "pytorch_model.bin"))
        AutoModelForCausalLM.from_pretrained(folder)
        capsys.readouterr()
    elif case == "missing_tensor":
        _rewrite_without(folder, drop="model.layers.1.mlp.up_proj.weight")
    elif case == "wrong_shape":
        _rewrite_without(folder, reshape="model.norm.weight")
    code = main(["import", "--hf", folder, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("alignx: error: ") and needle in err[0], err
    assert folder in err[0]


def _drop_config_keys(folder, *keys):
    path = os.path.join(folder, "config.json")
    cfg = json.loads(open(path).read())
    for key in keys:
        cfg.pop(key)
    with open(path, "w") as f:
        json.dump(cfg, f)


@pytest.mark.parametrize("kind, family_default", [("llama", 2048), ("qwen2", 32768)])
def test_import_without_max_position_embeddings_keeps_transformers_default(
    tiny_hf_checkpoints, tmp_path, capsys, kind, family_default
):
    """A config.json without max_position_embeddings was imported and exported with 8192, not the family's
    own default that transformers loads it with (LlamaConfig 2048, Qwen2Config 32768)."""
    from transformers import AutoConfig

    src = _copy(tiny_hf_checkpoints[kind], tmp_path / "src")
    _drop_config_keys(src, "max_position_embeddings")
    assert AutoConfig.from_pretrained(src).max_position_embeddings == family_default
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    assert main(["import", "--hf", src, "--out", str(ckpt)]) == 0
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == family_default
    assert AutoConfig.from_pretrained(str(out)).max_position_embeddings == family_default


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"])
def test_config_defaults_are_the_transformers_config_class_defaults(model_type):
    """The keys config.json may omit take the value transformers' config class of the family gives them."""
    from transformers import AutoConfig

    from alignx_jax.models.config import DecoderConfig

    hf = {"model_type": model_type, "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32}
    cfg = DecoderConfig.from_hf({**hf, "num_hidden_layers": 2, "num_attention_heads": 2})
    theirs = AutoConfig.for_model(model_type)
    assert cfg.max_position_embeddings == theirs.max_position_embeddings
    assert cfg.tie_word_embeddings == theirs.tie_word_embeddings


def test_tied_qwen2_folder_without_tie_word_embeddings_is_one_clear_line(
    tiny_hf_checkpoints, tmp_path, capsys
):
    """A tied qwen2 folder (no lm_head.weight) whose config.json omits tie_word_embeddings: Qwen2Config
    unties by default, and transformers loads it with a random output head; the import said only
    'missing tensor' before. With the key set either way the folder's own word stands."""
    from transformers import AutoModelForCausalLM

    src = _copy(tiny_hf_checkpoints["qwen2"], tmp_path / "src")
    assert "lm_head.weight" not in SafetensorsReader(src)
    _drop_config_keys(src, "tie_word_embeddings")
    theirs = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    head, embed = theirs.lm_head.weight, theirs.model.embed_tokens.weight
    assert not torch.equal(head, embed)  # transformers drew a random head
    capsys.readouterr()
    assert main(["import", "--hf", src, "--out", str(tmp_path / "ckpt")]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"alignx: error: {src}: no 'lm_head.weight' and config.json does not set tie_word_embeddings, which "
        "Qwen2Config defaults to false (transformers would load a random output head); if the head is "
        'embed_tokens, add "tie_word_embeddings": true to config.json'
    ]
    cfg = json.loads(open(os.path.join(src, "config.json")).read())
    json.dump({**cfg, "tie_word_embeddings": False}, open(os.path.join(src, "config.json"), "w"))
    assert main(["import", "--hf", src, "--out", str(tmp_path / "ckpt")]) == 1
    assert "missing tensor 'lm_head.weight'" in capsys.readouterr().err
    json.dump({**cfg, "tie_word_embeddings": True}, open(os.path.join(src, "config.json"), "w"))
    assert main(["import", "--hf", src, "--out", str(tmp_path / "ckpt")]) == 0


def test_tied_gemma_folder_without_tie_word_embeddings_ties(tmp_path):
    """GemmaConfig ties by default: a folder without lm_head.weight and without the key loads tied."""
    from transformers import AutoModelForCausalLM, GemmaConfig

    cfg = GemmaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(tmp_path / "g")
    _drop_config_keys(str(tmp_path / "g"), "tie_word_embeddings")
    model = load_pretrained(str(tmp_path / "g"))
    assert model.cfg.tie_word_embeddings and model.cfg.to_hf()["tie_word_embeddings"] is True


def test_import_to_an_out_that_cannot_be_made_fails_before_reading_the_model(
    tiny_hf_checkpoints, tmp_path, capsys, monkeypatch
):
    """`--out ""` and `--out FILE/sub` failed at the folder's creation, after the whole model had been read,
    with the OSError's bare text (`alignx: error: No such file or directory`, no flag, no path)."""
    from alignx_jax import export

    def no_load(*a, **k):
        raise AssertionError("the model was read before --out was checked")

    monkeypatch.setattr(export, "load_pretrained", no_load)
    (tmp_path / "f").write_text("a file")
    for out, line in (
        ("", "alignx: error: --out: an empty path; name the checkpoint folder"),
        (
            str(tmp_path / "f" / "sub"),
            f"alignx: error: --out {tmp_path / 'f' / 'sub'}: cannot be written (a file where a folder would "
            f"go: {tmp_path / 'f'})",
        ),
    ):
        assert main(["import", "--hf", tiny_hf_checkpoints["qwen2"], "--out", out]) == 1
        assert capsys.readouterr().err.strip().splitlines() == [line]
    assert (tmp_path / "f").read_text() == "a file" and sorted(os.listdir(tmp_path)) == ["f"]


def test_import_warns_of_tensors_it_does_not_read(tiny_hf_checkpoints, tmp_path, capsys):
    """Tensors config.json's model has no place for (an MLP bias without `mlp_bias`, another model's
    weights) were dropped without a word; RoPE's inv_freq buffers and a tied model's lm_head are not
    weights transformers reads either, and stay unmentioned."""
    from safetensors.numpy import load_file, save_file

    folder = _copy(tiny_hf_checkpoints["qwen2"], tmp_path / "extra")
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # qwen2 here ties it
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    tensors["model.layers.1.mlp.up_proj.bias"] = np.ones(128, np.float32)
    save_file(tensors, path, metadata={"format": "pt"})
    assert main(["import", "--hf", folder, "--out", str(tmp_path / "ckpt")]) == 0
    assert capsys.readouterr().err.strip().splitlines() == [
        f"alignx import: warning: {folder}: 1 tensor(s) not part of a qwen2 model as config.json describes "
        "it, not imported: model.layers.1.mlp.up_proj.bias"
    ]
    assert main(["import", "--hf", tiny_hf_checkpoints["llama"], "--out", str(tmp_path / "plain")]) == 0
    assert capsys.readouterr().err == ""


def test_import_of_a_folder_without_tokenizer_warns(tiny_hf_checkpoints, tmp_path, capsys):
    """An HF folder without tokenizer files imported into a checkpoint without one, without a word: the
    export of it was refused by eval and generate, far from the cause."""
    folder = _copy(tiny_hf_checkpoints["qwen2"], tmp_path / "notok")
    for name in hf_lib.TOKENIZER_FILES:
        if os.path.exists(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    assert main(["import", "--hf", folder, "--out", str(tmp_path / "ckpt")]) == 0
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == [
        f"alignx import: warning: {folder}: no tokenizer files (tokenizer.json / tokenizer_config.json); the "
        "checkpoint has none (train with model.tokenizer set; copy them in for eval and generate)"
    ]
    assert out.startswith(f"imported {folder} -> ") and not checkpoint_lib.has_tokenizer(
        str(tmp_path / "ckpt")
    )


@pytest.mark.parametrize("broken", ["truncated", "not_a_tokenizer"])
def test_import_refuses_an_invalid_tokenizer_before_writing(tiny_hf_checkpoints, tmp_path, capsys, broken):
    """An HF folder whose tokenizer.json does not load imported and exported fine; eval and generate
    failed on it later. The import loads it as they do and names the file, writing nothing."""
    folder = _copy(tiny_hf_checkpoints["qwen2"], tmp_path / "badtok")
    path = os.path.join(folder, "tokenizer.json")
    text = open(path, encoding="utf-8").read()
    with open(path, "w", encoding="utf-8") as f:
        f.write(text[: len(text) // 2] if broken == "truncated" else '{"version": "1.0", "model": {}}')
    out = tmp_path / "ckpt"
    assert main(["import", "--hf", folder, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    head = f"alignx: error: {folder}: cannot load the tokenizer from tokenizer.json ("
    assert len(err) == 1 and err[0].startswith(head) and err[0].endswith("); fix or remove it"), err
    assert not out.exists()


def test_import_of_a_missing_hf_folder_names_the_flag_and_the_path_once(tmp_path, capsys):
    missing = str(tmp_path / "nope")
    assert main(["import", "--hf", missing, "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.strip() == f"alignx: error: --hf: model folder not found: {missing}"
    assert not (tmp_path / "out").exists()


def test_export_errors(tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    assert main(["export", "--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no config.json" in err[0]
    # an empty path was the working directory: `--out ""` named it (or exported into it with --overwrite)
    monkeypatch.chdir(tmp_path)
    for argv, line in (
        (["--checkpoint", "", "--out", "o"], "--checkpoint: an empty path; name a folder"),
        (["--checkpoint", "empty", "--out", ""], "--out: an empty path; name a folder"),
    ):
        assert main(["export", *argv, "--overwrite"]) == 1
        assert capsys.readouterr().err.strip().splitlines() == [f"alignx: error: {line}"]
    assert sorted(os.listdir(tmp_path)) == ["empty"]
    with pytest.raises(CheckpointError, match="not found"):
        resolve_checkpoint(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="shard size"):
        hf_lib.parse_size("lots")
    assert hf_lib.parse_size("200MB") == 200_000_000 and hf_lib.parse_size("5GB") == 5 * 10**9


@pytest.mark.parametrize(
    "size",
    ["5GiB", "200MiB", "3KiB", "2gib", "2GIB", "5GB", "200MB", "3KB", "5gB", "5Gb", "5gb", "7Mb", "3kb"],
)
def test_shard_size_units_are_read_as_transformers_reads_them(size):
    """--shard-size read GiB/MiB/KiB as powers of 10 (as GB), and 5Gb (gigabits) as 5GB; transformers' own
    reader is the reference."""
    from transformers.utils.hub import convert_file_size_to_int

    assert hf_lib.parse_size(size) == convert_file_size_to_int(size)


@pytest.mark.parametrize(
    "size, size_bytes",
    [
        ("2TB", 2 * 10**12),
        ("2TiB", 2 * 2**40),
        ("2tib", 2 * 2**40),
        ("2Tb", 2 * 10**12 // 8),
        ("1.1GB", 1_100_000_000),
        ("1.5GiB", 3 * 2**29),
        ("300", 300),
        ("300B", 300),
        ("300b", 300 // 8),
    ],
)
def test_shard_size_units_transformers_does_not_read(size, size_bytes):
    """--shard-size had no TB/TiB; past transformers' units the same rules hold (a lowercase b is bits)."""
    assert hf_lib.parse_size(size) == size_bytes


@pytest.mark.parametrize("size", ["lots", "0", "0.1B", "5PB", "5 G B"])
def test_export_refuses_a_bad_shard_size_before_reading_the_checkpoint(
    tiny_hf_checkpoints, tmp_path, capsys, monkeypatch, size
):
    """A malformed --shard-size was read when the shards were written, after the whole checkpoint had been
    loaded and verified; one under a byte put every tensor in a file of its own."""
    from alignx_jax import export

    ckpt = tmp_path / "ckpt"
    assert main(["import", "--hf", tiny_hf_checkpoints["qwen2"], "--out", str(ckpt)]) == 0
    capsys.readouterr()

    def no_load(*a, **k):
        raise AssertionError("the checkpoint was read before --shard-size was checked")

    monkeypatch.setattr(export, "load_checkpoint", no_load)
    out = tmp_path / "o"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--shard-size", size]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"alignx: error: --shard-size: shard size {size!r}"), err
    assert not out.exists()


def test_export_peft_of_a_checkpoint_without_adapters_is_refused_before_reading_it(
    tiny_hf_checkpoints, tmp_path, capsys, monkeypatch
):
    """`--peft` on a full model was refused when the adapters were written, after the whole checkpoint had
    been loaded and verified; the params' metadata says there are none."""
    from alignx_jax import export

    ckpt = tmp_path / "ckpt"
    assert main(["import", "--hf", tiny_hf_checkpoints["qwen2"], "--out", str(ckpt)]) == 0
    capsys.readouterr()

    def no_load(*a, **k):
        raise AssertionError("the checkpoint was read before --peft was checked")

    monkeypatch.setattr(export, "load_checkpoint", no_load)
    out = tmp_path / "o"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--peft"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "alignx: error: --peft: the checkpoint has no LoRA adapters (train with model.lora.rank > 0)"
    ]
    assert not out.exists()


def test_export_checks_results_before_reading_the_checkpoint(
    tiny_hf_checkpoints, tmp_path, capsys, monkeypatch
):
    """A --results file that is no eval results was refused when the model card was written, after the whole
    checkpoint had been loaded and verified; with --peft (no model card) it was ignored without a word."""
    from alignx_jax import export

    ckpt = tmp_path / "ckpt"
    assert main(["import", "--hf", tiny_hf_checkpoints["qwen2"], "--out", str(ckpt)]) == 0
    capsys.readouterr()

    def no_load(*a, **k):
        raise AssertionError("the checkpoint was read before --results was checked")

    monkeypatch.setattr(export, "load_checkpoint", no_load)
    (tmp_path / "r.json").write_text('{"benchmarks": {}}')
    out = tmp_path / "o"
    for extra, line in (
        (
            ["--results", str(ckpt / "config.json")],
            f"--results {ckpt / 'config.json'}: not an `alignx eval` results file (no benchmarks)",
        ),
        (["--results", str(tmp_path / "r.json"), "--peft"], "--results: --peft writes no model card"),
    ):
        assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), *extra]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"alignx: error: {line}"), err
    assert not out.exists()


def test_export_of_a_step_folder_names_the_workdir_and_step(tmp_path, capsys):
    """`alignx export --checkpoint W/checkpoints/N` (a step folder, whose config lives in W/reference) said
    only `no config.json (not a model checkpoint or training workdir)`; it names the workdir and the step to
    give instead. A folder of that name outside a workdir keeps the plain error."""
    w = tmp_path / "w"
    (w / "reference").mkdir(parents=True)
    (w / "checkpoints" / "7" / "params").mkdir(parents=True)
    step = w / "checkpoints" / "7"
    assert main(["export", "--checkpoint", str(step), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"a saved step of the training workdir {w}" in err[0], err
    assert f"alignx export --checkpoint {w} --step 7" in err[0] and not (tmp_path / "o").exists()
    (w / "reference").rmdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        resolve_checkpoint(str(step))
