"""The README.md model card of an `alignx export` folder, and what it is built from.

The card names the base model (a hub id gets `base_model:` front matter), the method (ICA, PBA or
non-personalized DPO), the training data and the key training settings (from a workdir's W/config.json),
eval results (`alignx eval` results files given with `--results`, or found in the workdir and not
scoring another step's or model's export), the paper's sampling settings for generation (also `alignx
generate`'s defaults; they are not written into generation_config.json, which stays the base model's, or
holds the token ids alone where there was none to keep), and the base model's license line.

`alignx import` records where a model came from in the checkpoint's `BASE_INFO` file, so an export of an
imported (or trained-from-imported) checkpoint still knows its base model and license; of an imported
`alignx export` folder, the base that export recorded, not the folder.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Callable
from typing import Any

BASE_INFO = (
    "alignx_base.json"  # in an `alignx import` checkpoint: {"base_model", "license", "prompt_format"?, ...}
)
EXPORT_MANIFEST = "alignx_export.json"  # in every exported folder: what wrote it and the files it wrote
CARD = "README.md"
# the paper's sampling settings (AlignX release; `alignx generate` defaults)
SAMPLING = {"do_sample": True, "temperature": 0.9, "top_k": 10, "top_p": 0.95}
# what `models.hf.save_hf` writes into generation_config.json where it has no base model's to keep
TOKEN_ID_KEYS = frozenset({"bos_token_id", "eos_token_id", "pad_token_id"})
METHODS = {
    "ica": "ICA (in-context alignment: the persona in the prompt)",
    "pba": "PBA (preference-bridged alignment: a preference head predicts P̃)",
    "none": "non-personalized DPO (no persona)",
}


def read_license(folder: str | None) -> str | None:
    """The `license:` of a HF folder's README.md front matter (or of its BASE_INFO), else None."""
    if not folder or not os.path.isdir(folder):
        return None
    info = read_base_info(folder)
    if info.get("license"):
        return str(info["license"])
    return _front_matter(folder, "license")


def _front_matter(folder: str, key: str) -> str | None:
    """The one-line `key:` of a local folder's README.md front matter, else None."""
    try:
        with open(os.path.join(folder, CARD), encoding="utf-8") as f:
            text = f.read(65536)
    except (OSError, UnicodeDecodeError):
        return None
    m = re.match(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", text, re.S)
    if not m:
        return None
    for line in m.group(1).splitlines():
        k, _, v = line.partition(":")
        if k.strip() == key and v.strip():
            return v.strip().strip("'\"")
    return None


def exported_base(folder: str) -> str | None:
    """The base model a local `alignx export` folder records: its manifest's `base_model`, else (an export
    written before the manifest recorded it) its card's `base_model:` front matter, a hub id less its
    revision; None for a folder that is no export, or an export whose base was not known."""
    try:
        with open(os.path.join(folder, EXPORT_MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        return None
    base = manifest.get("base_model")
    if isinstance(base, str) and base:
        return base
    return _front_matter(folder, "base_model")


def read_base_info(folder: str | None) -> dict[str, Any]:
    """BASE_INFO of a local or URL (gs://) folder; {} when it has none."""
    from alignx_jax import paths

    if not folder:
        return {}
    try:
        info = json.loads(paths.path(os.path.join(folder, BASE_INFO)).read_text(encoding="utf-8"))
    except Exception:  # absent or unreadable (a bucket client raises its own types): no record
        return {}
    return info if isinstance(info, dict) else {}


def base_record(model_path: str, src_folder: str | None) -> dict[str, Any]:
    """What BASE_INFO records of a model path as the user gave it, decided now (from the directory it was
    given in): a hub id or URL stays one, a local path becomes absolute (read later from elsewhere, `m/x`
    would pass for a hub id), an imported checkpoint passes on the base it recorded, and an `alignx export`
    folder the base its export recorded (`exported_base`), the folder itself kept as `export_folder`."""
    from alignx_jax.hub import parse_hub_id

    info = read_base_info(src_folder) if src_folder and os.path.isdir(src_folder) else {}
    if info.get("base_model"):
        return {"base_model": info["base_model"], "license": info.get("license") or read_license(src_folder)}
    local = parse_hub_id(model_path) is None and "://" not in model_path and os.path.exists(model_path)
    given = os.path.abspath(model_path) if local else model_path
    exported = exported_base(src_folder) if src_folder and os.path.isdir(src_folder) else None
    if exported:  # the export folder is a copy of a trained model, not its base: cards name the original
        return {"base_model": exported, "license": read_license(src_folder), "export_folder": given}
    return {"base_model": given, "license": read_license(src_folder)}


def write_base_info(
    folder: str, base_model: str, src_folder: str | None, *, prompt_format: str | None = None
) -> str:
    """BASE_INFO for an imported checkpoint (the `--hf` argument) or a run's W/reference (`model.hf_path`).
    `prompt_format`: the format the imported model was trained with (its export recorded it), kept so an
    export of the checkpoint records it again (`export.trained_prompt_format`)."""
    record = base_record(base_model, src_folder)
    if prompt_format:
        record["prompt_format"] = prompt_format
    with open(os.path.join(folder, BASE_INFO), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, sort_keys=True)
    return BASE_INFO


def read_run_config(checkpoint: str) -> dict[str, Any] | None:
    """W/config.json of a training workdir, local or a URL (the run's whole config), None for a model
    checkpoint."""
    from alignx_jax import paths

    try:
        cfg = json.loads(paths.path(os.path.join(checkpoint, "config.json")).read_text(encoding="utf-8"))
    except Exception:  # absent or unreadable (a bucket client raises its own types)
        return None
    ok = isinstance(cfg, dict) and isinstance(cfg.get("model"), dict) and isinstance(cfg.get("data"), dict)
    return cfg if ok else None


def _is_eval_results(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("benchmarks"), dict)


def find_results(
    checkpoint: str, given: list[str] | None, scored_this: Callable[[str], bool] | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """(path, results) of `alignx eval` results files: `given` ones (each must be one), else those found
    in a workdir (W/results.json, W/eval*.json, W/eval/*.json) whose recorded `model` folder
    `scored_this` accepts (all without it, or without a recorded `model`)."""
    from alignx_jax.errors import CheckpointError

    out = []
    if given:
        for path in given:
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"--results {path}: cannot read it ({e})") from None
            if not _is_eval_results(data):
                raise CheckpointError(f"--results {path}: not an `alignx eval` results file (no benchmarks)")
            out.append((path, data))
        return out
    if not os.path.isdir(os.path.join(checkpoint, "checkpoints")):
        return out
    for pattern in ("results.json", "eval*.json", os.path.join("eval", "*.json")):
        for path in sorted(glob.glob(os.path.join(checkpoint, pattern))):
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
            except (OSError, ValueError):
                continue
            model = data.get("model") if isinstance(data, dict) else None
            # a file scoring another model (the base, another step's export) holds no numbers of this one
            if _is_eval_results(data) and (
                scored_this is None or not isinstance(model, str) or scored_this(model)
            ):
                out.append((path, data))
    return out


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{100 * float(x):.1f}"


def _results_lines(results: list[tuple[str, dict[str, Any]]]) -> list[str]:
    lines = ["| results file | method | benchmark | accuracy % | n | 95% CI |", "|---|---|---|---|---|---|"]
    for path, data in results:
        for key, entry in sorted(data["benchmarks"].items()):
            if not isinstance(entry, dict):
                continue
            # one result, or one per persona variant (AlignX-test: {ugc, pair, demo, p})
            items = [(key, entry)] if "accuracy" in entry else [(f"{key}/{v}", b) for v, b in entry.items()]
            for name, b in items:
                if not isinstance(b, dict):
                    continue
                ci = b.get("ci95") or [None, None]
                lines.append(
                    f"| {os.path.basename(path)} | {data.get('method', '')} | {name} | {_pct(b.get('accuracy'))} "
                    f"| {b.get('n', '')} | [{_pct(ci[0])}, {_pct(ci[1])}] |"
                )
    return lines


def _base_text(base_model: str | None, run_cfg: dict[str, Any] | None) -> str:
    """The card's base model: the recorded one, a scratch run's random init, else unknown."""
    if base_model:
        return f"`{base_model}`"
    model = (run_cfg or {}).get("model") or {}
    # no model.hf_path: training started from random weights (config_rules requires model.init.enabled)
    if run_cfg is not None and not model.get("hf_path") and (model.get("init") or {}).get("enabled"):
        return "none: randomly initialised (`model.init`), trained from scratch"
    return "unknown"


def _steps_settings(train: dict[str, Any], step: int | None) -> list[tuple[str, Any]]:
    """The card's steps/epochs: train.steps as set, or for -1 the steps the exported checkpoint ran."""
    steps, epochs = train.get("steps"), train.get("epochs")
    if steps != -1:  # a fixed step count: train.epochs is not read
        return [("steps", steps)]
    # -1: as many steps as `epochs` passes over the data take
    return [("steps", None if step is None else f"{step} (set by epochs)"), ("epochs", epochs)]


def _lora_settings(model: dict[str, Any]) -> list[tuple[str, Any]]:
    """A model.lora run's rank, alpha (0 stands for 2 * rank) and target modules; none without LoRA."""
    lora = model.get("lora") or {}
    rank = lora.get("rank") or 0
    if not rank:
        return []
    targets = lora.get("targets")
    targets = [targets] if isinstance(targets, str) else list(targets or [])
    return [
        ("LoRA rank", rank),
        ("LoRA alpha", f"{float(lora.get('alpha') or 2 * rank):g}"),
        ("LoRA target modules", "/".join(str(t) for t in targets)),
    ]


def _holds_sampling_settings(folder: str) -> bool:
    """Whether `folder`'s generation_config.json holds more than token ids (the base model's, kept)."""
    try:
        with open(os.path.join(folder, "generation_config.json"), encoding="utf-8") as f:
            gen = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(gen, dict) and bool(set(gen) - TOKEN_ID_KEYS)


def build_card(
    *,
    name: str,
    source: str,
    step: int | None,
    base_model: str | None,
    license_: str | None,
    run_cfg: dict[str, Any] | None,
    results: list[tuple[str, dict[str, Any]]],
    dtype: str,
    has_head: bool,
    base_generation: bool = True,
) -> str:
    """`base_generation`: generation_config.json is the base model's (else it holds the token ids alone)."""
    from alignx_jax.hub import parse_hub_id

    data = (run_cfg or {}).get("data") or {}
    method = str(data.get("method") or "") or None
    hub = base_model if base_model and parse_hub_id(base_model) is not None else None
    front = ["---", "library_name: transformers"]
    if license_:
        front.append(f"license: {license_}")
    if hub:
        front.append(f"base_model: {hub.split('@')[0]}")
    front += ["tags:", "- alignx", "- dpo", "- personalized-alignment"]
    if method in ("ica", "pba"):
        front.append(f"- {method}")
    front.append("---")
    out = [*front, "", f"# {name}", ""]
    out.append(
        f"Exported by alignx-jax from `{source}`"
        + (f" (step {step})" if step is not None else "")
        + f"; weights in {dtype} safetensors, loadable with `transformers.AutoModelForCausalLM`."
    )
    out += ["", f"- Base model: {_base_text(base_model, run_cfg)}"]
    if run_cfg is not None:
        model, loss, optim, train = (run_cfg.get(k) or {} for k in ("model", "loss", "optim", "train"))
        lora = _lora_settings(model)
        out.append(f"- Method: {METHODS.get(method or '', method or 'unknown')}")
        out.append(f"- Training data: `{data.get('train') or 'synthetic users (W/data)'}`")
        keys = [
            ("persona", data.get("persona")),
            ("prompt format", data.get("prompt_format")),
            ("max length", data.get("max_length")),
            ("loss", loss.get("type")),
            ("beta", loss.get("beta")),
            ("learning rate", optim.get("lr")),
            ("global batch", train.get("global_batch")),
            *_steps_settings(train, step),
            *lora,
        ]
        out.append("- Training settings: " + ", ".join(f"{k} {v}" for k, v in keys if v not in (None, "")))
        if lora:  # the export is the merged model: nothing else tells it came from adapters
            out.append(
                "- Weights: LoRA adapters merged into the base model's (W + alpha / rank * A B); "
                "`alignx export --peft` writes the adapters alone"
            )
    else:
        out.append("- Method: not recorded (a model checkpoint, not a training workdir)")
    if has_head:
        out.append(
            "- Preference head: `preference_head.safetensors` + `preference_head_config.json` "
            "(PBA's P̃ predictor; `alignx predict-preferences`)"
        )
    out += ["", "## Evaluation", ""]
    if results:
        out += _results_lines(results)
    else:
        out.append("No results recorded (`alignx export --results RESULTS.json` adds `alignx eval` results).")
    s = SAMPLING
    out += [
        "",
        "## Generation",
        "",
        f"The paper samples with temperature {s['temperature']}, top-k {s['top_k']} and top-p {s['top_p']} "
        "(the defaults of `alignx generate`). "
        + (
            "`generation_config.json` is the base model's, unchanged"
            if base_generation
            else "`generation_config.json` holds only the token ids (bos, eos, pad), no sampling settings"
        )
        + "; pass the settings explicitly:",
        "",
        "```python",
        f"model.generate(**inputs, do_sample=True, temperature={s['temperature']}, top_k={s['top_k']}, "
        f"top_p={s['top_p']})",
        "```",
        "",
    ]
    if method == "ica":
        out += [
            "Prompts carry the user's persona as in training (`alignx generate --method ica --persona FILE`).",
            "",
        ]
    out += ["## License", "", license_ or "Not recorded: see the base model's license.", ""]
    return "\n".join(out)


def card_base(checkpoint: str, config_dir: str) -> tuple[str | None, str | None]:
    """(base model, license) an export of `checkpoint` (a workdir or model checkpoint) names: what the run
    recorded in W/reference (else its `model.hf_path`), or what an imported checkpoint's BASE_INFO holds."""
    run_cfg = read_run_config(checkpoint) if os.path.isdir(os.path.join(checkpoint, "checkpoints")) else None
    if run_cfg is None:
        info = read_base_info(checkpoint)
        return info.get("base_model"), info.get("license")
    hf_path = str((run_cfg.get("model") or {}).get("hf_path") or "")
    # what training recorded in W/reference (runs before it: model.hf_path, read from here)
    info = read_base_info(os.path.join(checkpoint, "reference"))
    if not info.get("base_model"):
        info = read_base_info(hf_path) if hf_path and os.path.isdir(hf_path) else {}
    return info.get("base_model") or hf_path or None, info.get("license") or read_license(config_dir)


def write_card(
    out_dir: str,
    *,
    checkpoint: str,
    config_dir: str,
    source: str,
    step: int | None,
    dtype: str,
    has_head: bool,
    results_files: list[str] | None = None,
    name: str | None = None,
    scored_this: Callable[[str], bool] | None = None,
) -> str:
    """Write OUT/README.md for an export of `checkpoint` (a workdir or model checkpoint); returns CARD.
    `scored_this`: `find_results`' test of a found results file's model folder."""
    run_cfg = read_run_config(checkpoint) if os.path.isdir(os.path.join(checkpoint, "checkpoints")) else None
    base_model, license_ = card_base(checkpoint, config_dir)
    results = find_results(checkpoint, results_files, scored_this)
    text = build_card(
        name=name or os.path.basename(os.path.abspath(out_dir)),
        source=source,
        step=step,
        base_model=base_model,
        license_=license_,
        run_cfg=run_cfg,
        results=results,
        dtype=dtype,
        has_head=has_head,
        # the file save_hf wrote: the base's kept, else the token ids alone (no base, or a base without one)
        base_generation=_holds_sampling_settings(out_dir),
    )
    with open(os.path.join(out_dir, CARD), "w", encoding="utf-8") as f:
        f.write(text)
    return CARD
