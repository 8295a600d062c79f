"""GGUF (llama.cpp) files -> Decoder params and an HF-style config, for `alignx import --gguf`.

Only tensors and metadata are read here: the config.json dict comes from the `{arch}.*` keys, the
tensors from the `gguf` package's reader, dequantized to float32 by `gguf.quants.dequantize` one
tensor at a time and renamed to the HF names `hf.param_maps` uses. llama.cpp's converter permutes
the rows of a llama q/k projection (its RoPE pairs neighbours, HF's rotate-half pairs halves); we
undo that, as transformers' GGUF loader does (qwen2 files are not permuted). The tokenizer and chat
template come from the same metadata (`save_gguf_tokenizer`): byte-level BPE vocabularies are built
here with the `tokenizers` library, so a plain install (no torch) imports them; others by transformers.
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
from typing import Any

import numpy as np

from alignx_jax.errors import CheckpointError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
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
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_HF_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
_GGUF_GLOBAL = {v: k for k, v in _GLOBAL_NAMES.items()}
_GGUF_LAYER = {v: k for k, v in _LAYER_NAMES.items()}
# Llama-3.1/3.2's RoPE scaling bands; llama.cpp stores only the resulting per-frequency factors
_LLAMA3_BANDS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}


def hf_tensor_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None for a name with no HF twin."""
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES and suffix in ("weight", "bias"):
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    return None


@functools.cache
def _dequantizable(qtype) -> bool:
    """Whether `gguf.quants.dequantize` knows this type (probed on one zero block)."""
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    if qtype not in GGML_QUANT_SIZES:
        return False
    _, type_size = GGML_QUANT_SIZES[qtype]
    try:
        dequantize(np.zeros((1, type_size), np.uint8), qtype)
    except (NotImplementedError, ValueError, TypeError):
        return False
    return True


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: per head, rows (0, 1, 2, 3, ...) were (0, d/2, 1, d/2+1, ...)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFFile:
    """One GGUF file (memory-mapped): its HF-style config dict and its tensors under HF names,
    with the `__contains__` / `shape` / `get` interface of `safetensors_io.SafetensorsReader`."""

    def __init__(self, path: str):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise CheckpointError(f"GGUF file not found: {path}")
        from gguf import GGUFReader

        try:
            self.reader = GGUFReader(path)
        except Exception as e:  # bad magic, truncated file, ...
            msg = " ".join(str(e).split())
            raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {msg})") from None
        self.path = path
        if int(self.field("split.count", 1)) > 1:
            raise CheckpointError(
                f"{path}: a split GGUF (one of {self.field('split.count')} files); merge it "
                "first with `llama-gguf-split --merge`"
            )
        self.arch = str(self.field("general.architecture", ""))
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"{path}: unsupported GGUF architecture {self.arch!r} (supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        self.tensors: dict[str, Any] = {}  # HF name -> gguf ReaderTensor
        self.gguf_names: dict[str, str] = {}  # HF name -> GGUF name, for error messages
        rope_freqs = None
        for t in self.reader.tensors:
            if t.name == "rope_freqs.weight":
                rope_freqs = t
                continue
            name = hf_tensor_name(t.name)
            if name is None:
                raise CheckpointError(f"{path}: tensor {t.name!r} has no place in a {self.arch} model")
            if not _dequantizable(t.tensor_type):
                raise CheckpointError(
                    f"{path}: tensor {t.name!r} has quantization type {t.tensor_type.name}, "
                    "which the gguf package cannot dequantize"
                )
            self.tensors[name], self.gguf_names[name] = t, t.name
        try:
            self.hf_config = self._config()
        except (TypeError, ValueError) as e:  # e.g. a per-layer list where llama has one number
            raise CheckpointError(f"{path}: malformed {self.arch} metadata ({e})") from None
        if rope_freqs is not None:
            self._rope_freqs_to_scaling(rope_freqs)

    # ---- metadata ----
    def field(self, key: str, default: Any = None) -> Any:
        f = self.reader.get_field(key)
        if f is None:
            return default
        return f.contents()

    def eos_token_ids(self) -> list[int]:
        """The ids that end a response: eos, then the end-of-turn and end-of-message ids (Llama-3.1's
        `<|eot_id|>`, `<|eom_id|>`; Gemma-2's `<end_of_turn>`) where they differ from it."""
        ids: list[int] = []
        for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
            value = self.field(f"tokenizer.ggml.{key}")
            if value is not None and int(value) not in ids:
                ids.append(int(value))
        return ids

    def _config(self) -> dict[str, Any]:
        a = self.arch
        need = {
            "embedding_length": "hidden_size",
            "feed_forward_length": "intermediate_size",
            "block_count": "num_hidden_layers",
            "attention.head_count": "num_attention_heads",
        }
        cfg: dict[str, Any] = {}
        for key, hf_key in need.items():
            value = self.field(f"{a}.{key}")
            if value is None:
                raise CheckpointError(f"{self.path}: GGUF metadata lacks {a}.{key}")
            cfg[hf_key] = int(value)
        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        if "model.embed_tokens.weight" not in self.tensors:
            raise CheckpointError(f"{self.path}: missing tensor 'token_embd.weight'")
        # the embedding's rows are the vocabulary the weights were trained with
        vocab = int(self.tensors["model.embed_tokens.weight"].shape[-1])
        head_dim = self.field(f"{a}.attention.key_length")
        if head_dim is None and a == "llama":
            head_dim = self.field(f"{a}.rope.dimension_count")  # llama rotates whole heads
        cfg.update(
            model_type=a,
            vocab_size=vocab,
            num_key_value_heads=int(self.field(f"{a}.attention.head_count_kv", heads)),
            head_dim=int(head_dim or hidden // heads),
            max_position_embeddings=int(self.field(f"{a}.context_length", 8192)),
            rms_norm_eps=float(self.field(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
            tie_word_embeddings="lm_head.weight" not in self.tensors,
            hidden_act="silu",
        )
        rope: dict[str, Any] = {
            "rope_type": "default",
            "rope_theta": float(self.field(f"{a}.rope.freq_base", 10000.0)),
        }
        kind = self.field(f"{a}.rope.scaling.type", "none")
        if kind == "linear":
            rope.update(rope_type="linear", factor=float(self.field(f"{a}.rope.scaling.factor")))
        elif kind != "none":
            raise CheckpointError(
                f"{self.path}: unsupported RoPE scaling {kind!r} (supported: linear, Llama-3)"
            )
        cfg["rope_parameters"] = rope
        if a == "llama":
            cfg["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in self.tensors
        for key, hf_key in (
            ("bos_token_id", "bos_token_id"),
            ("eos_token_id", "eos_token_id"),
            ("padding_token_id", "pad_token_id"),
        ):
            value = self.field(f"tokenizer.ggml.{key}")
            cfg[hf_key] = None if value is None else int(value)
        return cfg

    def _rope_freqs_to_scaling(self, tensor) -> None:
        """llama.cpp writes Llama-3 RoPE scaling as per-frequency divisors; recover the config's
        rope_parameters when they are Llama-3.1's bands (any factor), else refuse."""
        from gguf.quants import dequantize

        from alignx_jax.models.decoder import DecoderConfig, rope_inv_freq

        divisors = np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float64).reshape(-1)
        if np.allclose(divisors, 1.0):
            return
        rope = self.hf_config["rope_parameters"]
        old_ctx = int(self.field(f"{self.arch}.rope.scaling.original_context_length", 8192))
        scaling = {
            "rope_type": "llama3",
            "factor": float(divisors.max()),
            **_LLAMA3_BANDS,
            "original_max_position_embeddings": old_ctx,
        }
        try:
            plain = DecoderConfig.from_hf(dict(self.hf_config))
        except CheckpointError as e:
            raise CheckpointError(f"{self.path}: {e}") from None
        ok = rope["rope_type"] == "default" and len(divisors) == plain.head_dim // 2
        if ok:
            scaled = plain.replace(rope_scaling=tuple(sorted(scaling.items())))
            ok = np.allclose(rope_inv_freq(scaled), rope_inv_freq(plain) / divisors, rtol=1e-4)
        if not ok:
            raise CheckpointError(
                f"{self.path}: tensor 'rope_freqs.weight' holds RoPE factors that are not "
                "Llama-3.1-style scaling (unsupported)"
            )
        self.hf_config["rope_parameters"] = {**scaling, "rope_theta": rope["rope_theta"]}

    # ---- tensors (the SafetensorsReader interface) ----
    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        # GGUF lists dimensions fastest-first; HF/numpy order is the reverse
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))

    def get(self, name: str) -> np.ndarray:
        """The float32 tensor in HF layout ([out, in] for projections)."""
        from gguf.quants import dequantize

        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: missing tensor {name!r}")
        t = self.tensors[name]
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(self.shape(name))
        except (NotImplementedError, ValueError) as e:
            raise CheckpointError(
                f"{self.path}: tensor {t.name!r} ({t.tensor_type.name}) cannot be dequantized ({e})"
            ) from None
        if not np.isfinite(w).all():  # named here, by the file's own tensor name, before anything is written
            raise CheckpointError(f"{self.path}: tensor {t.name!r} holds NaN/inf values")
        if self.arch == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
            c = self.hf_config
            w = _unpermute_rows(
                w, c["num_attention_heads"] if ".attn_q." in t.name else c["num_key_value_heads"]
            )
        return w

    def quant_types(self) -> list[str]:
        return sorted({t.tensor_type.name for t in self.tensors.values()})


def load_gguf(path: str, dtype: str = "float32", *, compute_dtype: str | None = None, **run_options: Any):
    """A llama/qwen2 GGUF file -> (Decoder with params in `dtype` on the default device, GGUFFile).
    One dequantized tensor (plus the param being stacked) is on the host at a time."""
    import jax
    from flax import nnx

    from alignx_jax.models import hf
    from alignx_jax.models.decoder import DecoderConfig

    src = GGUFFile(path)
    try:
        cfg = DecoderConfig.from_hf(
            dict(src.hf_config), **hf.decoder_run_options(dtype, compute_dtype, run_options)
        )
    except CheckpointError as e:
        raise CheckpointError(f"{src.path}: {e}") from None
    abstract = hf.abstract_decoder(cfg)
    state = nnx.state(abstract)
    flat = dict(nnx.to_flat_state(state))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    maps = hf.param_maps(cfg)
    L = cfg.num_hidden_layers
    for m in maps:  # every tensor present with the right shape before any dequantizing
        shape = tuple(flat[m.path].get_value().shape)
        want = m.expected_hf_shape(shape[1:] if m.layered else shape)
        for name in [m.hf_name.format(i=i) for i in range(L)] if m.layered else [m.hf_name]:
            gname = _gguf_name(name)
            if name not in src:
                raise CheckpointError(f"{src.path}: missing tensor {gname!r}")
            if src.shape(name) != tuple(want):
                raise CheckpointError(
                    f"{src.path}: tensor {gname!r} has shape {list(src.shape(name))} "
                    f"(HF order), expected {list(want)}"
                )
    extra = sorted(set(src.tensors) - {m.hf_name.format(i=i) for m in maps for i in range(L)})
    if extra:  # e.g. biases this architecture's config has no switch for
        raise CheckpointError(
            f"{src.path}: tensor {src.gguf_names[extra[0]]!r} is not used by a {cfg.model_type} "
            "model of this config (unsupported)"
        )
    for m in maps:
        var = flat[m.path]
        shape = tuple(var.get_value().shape)
        if m.layered:
            host = np.stack([m.to_ours(src.get(m.hf_name.format(i=i)), cfg) for i in range(L)]).astype(
                cfg.params_dtype
            )
        else:
            host = np.asarray(m.to_ours(src.get(m.hf_name), cfg), cfg.params_dtype)
        var.set_value(hf.place_array(shape, cfg.params_dtype, device, lambda idx, host=host: host[idx]))
        del host
    return nnx.merge(nnx.graphdef(abstract), state), src


def _gguf_name(hf_name: str) -> str:
    """The GGUF spelling of an HF tensor name (for messages about tensors a file lacks)."""
    m = _HF_LAYER_RE.fullmatch(hf_name)
    if m:
        return f"blk.{m.group(1)}.{_GGUF_LAYER.get(m.group(2), m.group(2))}.{m.group(3)}"
    base, _, suffix = hf_name.rpartition(".")
    return f"{_GGUF_GLOBAL.get(base, base)}.{suffix}"


def has_tokenizer(src: GGUFFile) -> bool:
    return src.reader.get_field("tokenizer.ggml.tokens") is not None


# GPT-2's split of text into pre-tokens, and the splits of the vocabularies (`tokenizer.ggml.pre`) that
# learned their merges on other splits; transformers' GGUF tokenizer uses the same table
_GPT2_PRE = ("default", "gpt2", "smollm")
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (a byte-level vocabulary spells its tokens in it)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in kept else next(extra)) for b in range(256)}


def byte_level_tokenizer(src: GGUFFile):
    """A byte-level BPE vocabulary (`tokenizer.ggml.model` gpt2: Llama-3, Qwen2, SmolLM2) as a
    transformers fast tokenizer, built with the `tokenizers` library from the file's metadata alone
    (transformers' own GGUF tokenizer needs torch to read the file). None for another vocabulary
    model or a `tokenizer.ggml.pre` split this table does not know (transformers builds those)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = str(src.field("tokenizer.ggml.pre", "default"))
    if src.field("tokenizer.ggml.model") != "gpt2" or (pre not in _GPT2_PRE and pre not in _PRE_SPLITS):
        return None
    tokens = [str(t) for t in src.field("tokenizer.ggml.tokens")]
    types = list(src.field("tokenizer.ggml.token_type", []) or [])
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    # a token with a character outside the byte alphabet is spelled in it from its UTF-8 bytes
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(tokens)
    }
    merges = [tuple(m.split(" ")) for m in src.field("tokenizer.ggml.merges", [])]
    tok = Tokenizer(
        models.BPE(
            vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False
        )
    )
    if pre in _PRE_SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # control tokens stay whole and special; one spelled outside the byte alphabet is a mislabel (skipped)
    tok.add_special_tokens(
        [
            AddedToken(t, normalized=False, special=True)
            for t, k in zip(tokens, types)
            if k == _CONTROL and set(t) <= alphabet
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, normalized=False, special=False)
            for t, k in zip(tokens, types)
            if k == _USER_DEFINED and t in vocab
        ]
    )

    def special(key: str) -> tuple[str | None, int | None]:
        i = src.field(f"tokenizer.ggml.{key}_token_id")
        return (tokens[int(i)], int(i)) if i is not None else (None, None)

    (bos, bos_id), (eos, eos_id) = special("bos"), special("eos")
    # llama.cpp's add_bos/add_eos flags become the post-processor's template
    marks = [(bos, bos_id)] * bool(bos and src.field("tokenizer.ggml.add_bos_token", False))
    tail = [(eos, eos_id)] * bool(eos and src.field("tokenizer.ggml.add_eos_token", False))

    def template(seq: str, type_id: int) -> list[str]:
        return [
            *(f"{t}:{type_id}" for t, _ in marks),
            f"${seq}:{type_id}",
            *(f"{t}:{type_id}" for t, _ in tail),
        ]

    tok.post_processor = processors.TemplateProcessing(
        single=template("A", 0),
        pair=template("A", 0) + template("B", 1),
        special_tokens=list({*marks, *tail}),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        unk_token=special("unknown")[0],
        pad_token=special("padding")[0],
        chat_template=src.field("tokenizer.chat_template"),
    )


def save_gguf_tokenizer(src: GGUFFile, out_dir: str) -> None:
    """The file's tokenizer and chat template as tokenizer files: byte-level BPE vocabularies built
    here from the metadata (no torch needed), others by transformers' GGUF tokenizer (which reads the
    file with torch)."""
    path = os.path.abspath(src.path)
    try:
        tok = byte_level_tokenizer(src)
        if tok is None:
            kind = f"tokenizer.ggml.model {src.field('tokenizer.ggml.model')!r}, pre {src.field('tokenizer.ggml.pre')!r}"
            tok = _transformers_gguf_tokenizer(path, kind)
        tok.save_pretrained(out_dir)
    except CheckpointError:
        raise
    except Exception as e:  # the library's own message, on one line
        msg = " ".join(str(e).split())
        raise CheckpointError(f"{path}: cannot build its tokenizer ({type(e).__name__}: {msg})") from None


def _transformers_gguf_tokenizer(path: str, kind: str):
    import importlib.util

    from transformers import AutoTokenizer

    if importlib.util.find_spec("torch") is None:
        raise CheckpointError(
            f"{path}: its tokenizer ({kind}) is built by transformers' GGUF reader, which needs "
            "torch (pip install torch)"
        )
    return AutoTokenizer.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), local_files_only=True
    )


def import_gguf(path: str, out_dir: str, *, dtype: str = "float32"):
    """`alignx import --gguf`: write the model checkpoint `alignx import --hf` writes; returns (model, GGUFFile)."""
    from alignx_jax import model_card
    from alignx_jax.models import checkpoint

    model, src = load_gguf(path, dtype=dtype)
    with tempfile.TemporaryDirectory(prefix="alignx-gguf-tok-") as tok_dir:
        if has_tokenizer(src):  # built before anything is written: a bad tokenizer leaves no half checkpoint
            save_gguf_tokenizer(src, tok_dir)
        os.makedirs(out_dir, exist_ok=True)
        model_card.write_base_info(out_dir, path, None)  # first: it marks the folder as an import's
        checkpoint.save_checkpoint(model, out_dir, tokenizer_dir=tok_dir if os.listdir(tok_dir) else None)
    write_generation_config(src, model.cfg, out_dir)
    checkpoint.remove_head_files(out_dir)  # a stale head from an earlier import would pair with this model
    return model, src


def write_generation_config(src: GGUFFile, cfg, out_dir: str) -> None:
    """The checkpoint's generation_config.json (an export copies it): the file's eos and end-of-turn ids,
    which config.json's one eos id cannot list; replaces an earlier import's."""
    from alignx_jax.models import hf

    ids = src.eos_token_ids()
    eos = ids if len(ids) > 1 else (ids[0] if ids else cfg.to_hf()["eos_token_id"])
    hf.write_generation_config(out_dir, cfg.bos_token_id, eos, cfg.pad_token_id)


def cli_import(args) -> int:
    from alignx_jax.models import checkpoint

    checkpoint.check_import_target(args.out, bool(getattr(args, "overwrite", False)))
    if not os.path.isfile(args.gguf):  # the flag named, as `import --hf` names its own
        raise CheckpointError(f"--gguf: GGUF file not found: {args.gguf}")
    model, src = import_gguf(args.gguf, args.out, dtype=args.dtype)
    tok = "" if has_tokenizer(src) else ", no tokenizer in the file"
    print(
        f"imported {args.gguf} -> {args.out} ({model.cfg.model_type}, {model.cfg.num_hidden_layers} layers, "
        f"{args.dtype} from {'/'.join(src.quant_types())}{tok})"
    )
    return 0
