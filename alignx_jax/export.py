"""`alignx import` (HF folder -> model checkpoint) and `alignx export` (model checkpoint or training
workdir -> HF folder, PEFT adapters, or a bucket): the commands, the export target's checks, its
atomic publication and recovery, and what they read of a run's workdir (its config.json)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys

from alignx_jax import distributed, paths
from alignx_jax.errors import CheckpointError, one_line
from alignx_jax.models.checkpoint import (
    ResolvedCheckpoint,
    check_import_target,
    has_lora_adapters,
    has_tokenizer,
    load_checkpoint,
    load_checkpoint_head,
    remove_head_files,
    resolve_checkpoint,
    save_checkpoint,
)
from alignx_jax.models.decoder import Decoder
from alignx_jax.models.hf import (
    EXPORT_MANIFEST,
    EXPORT_UPLOAD,
    TOKENIZER_FILES,
    copy_tokenizer,
    load_pretrained,
    parse_size,
    read_export_manifest,
    read_hf_config,
    save_hf,
    save_peft,
    unread_tensors,
    write_export_manifest,
)
from alignx_jax.models.safetensors_io import holds_safetensors

# what transformers may load from a folder besides the export's own files: other weights, their index,
# or adapters (an adapter_config.json makes from_pretrained load a PEFT adapter)
WEIGHT_FILE = re.compile(r".+\.(safetensors|bin|pt|pth|h5|msgpack|gguf)|.+\.index\.json|adapter_config\.json")


def _copy_head_files(src: str, out_dir: str) -> None:
    from alignx_jax.models import preference_head as ph

    for name in (ph.HEAD_WEIGHTS_FILE, ph.HEAD_CONFIG_FILE):
        shutil.copyfile(os.path.join(src, name), os.path.join(out_dir, name))


def _check_tokenizer(src: str, given: str) -> None:
    """The tokenizer files of `src` loaded as eval and generate load them (`tokenizer.load_tokenizer`);
    CheckpointError naming `given` (the --hf argument) and the file that does not load."""
    from alignx_jax.tokenizer import load_tokenizer

    try:
        load_tokenizer(src)
    except CheckpointError as e:
        why = one_line(e.__cause__) if e.__cause__ is not None else str(e)
        raise CheckpointError(
            f"{given}: cannot load the tokenizer from {_unloadable_tokenizer_file(src)} ({why}); "
            "fix or remove it"
        ) from None


def _unloadable_tokenizer_file(src: str) -> str:
    """Which of `src`'s tokenizer files does not load: one that is no JSON, else a tokenizer.json the
    tokenizers library refuses, else all of them (the loader's error is about how they combine)."""
    present = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
    for name in (n for n in present if n.endswith(".json")):
        try:
            with open(os.path.join(src, name), encoding="utf-8") as f:
                json.load(f)
        except (OSError, ValueError):
            return name
    if "tokenizer.json" in present:
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(os.path.join(src, "tokenizer.json"))
        except Exception:  # the library's one error type carries no file name
            return "tokenizer.json"
    return " / ".join(present)


def cli_import(args) -> int:
    from alignx_jax import model_card
    from alignx_jax.models import preference_head as ph
    from alignx_jax.models.presets import resolve_model_folder

    check_import_target(args.out, bool(getattr(args, "overwrite", False)))
    src = resolve_model_folder(args.hf, "--hf")  # a local folder, or a hub id's snapshot in the HF cache
    if paths.same_place(src, args.out):
        raise CheckpointError(f"--out {args.out}: is the --hf folder itself; import into another folder")
    if os.path.isdir(os.path.join(src, "checkpoints")) and model_card.read_run_config(src) is not None:
        raise CheckpointError(
            f"{args.hf}: a training workdir, not an HF folder; `alignx export --checkpoint {args.hf} --out DIR` "
            "makes an HF folder of it"
        )
    model = load_pretrained(src, dtype=args.dtype)
    unread = unread_tensors(src, model.cfg)
    if unread:  # weights of something config.json does not describe: the import computes without them
        print(
            f"alignx import: warning: {args.hf}: {len(unread)} tensor(s) not part of a {model.cfg.model_type} "
            f"model as config.json describes it, not imported: {paths.listing(unread)}",
            file=sys.stderr,
        )
    head = None
    if ph.has_head(src):  # read first: a malformed or mismatched head fails before anything is written
        head, hcfg = ph.load_head(src)
        ph.check_backbone(hcfg, model.cfg.hidden_size, args.hf)
    if has_tokenizer(src):  # a broken one imported fine and failed in eval/generate, far from its cause
        _check_tokenizer(src, args.hf)
    os.makedirs(args.out, exist_ok=True)
    # first: it marks the folder as an import's; the trained prompt format goes with the weights, so an
    # export of this checkpoint defaults eval/generate to it as the imported folder did
    model_card.write_base_info(args.out, args.hf, src, prompt_format=trained_prompt_format(src))
    save_checkpoint(model, args.out, tokenizer_dir=src if has_tokenizer(src) else None)
    if not has_tokenizer(src):  # the checkpoint and its export have none: eval and generate refuse them
        print(
            f"alignx import: warning: {args.hf}: no tokenizer files (tokenizer.json / tokenizer_config.json); "
            "the checkpoint has none (train with model.tokenizer set; copy them in for eval and generate)",
            file=sys.stderr,
        )

    # what an export of this checkpoint keeps of the base: its generation_config.json as it is, and
    # where it came from (the `--hf` argument, a hub id stays one) with its license, for the model card
    gen = os.path.join(src, "generation_config.json")
    if os.path.isfile(gen):
        shutil.copyfile(gen, os.path.join(args.out, "generation_config.json"))
    elif os.path.isfile(os.path.join(args.out, "generation_config.json")):
        os.remove(os.path.join(args.out, "generation_config.json"))
    remove_head_files(args.out)
    if head is not None:  # kept byte for byte: `alignx export` of this checkpoint copies them back
        _copy_head_files(src, args.out)
    print(
        f"imported {args.hf} -> {args.out} ({model.cfg.model_type}, {model.cfg.num_hidden_layers} layers, "
        f"{args.dtype}{', with preference head' if head is not None else ''})"
    )
    return 0


def _beside(out: str, tag: str, pid: int | None = None) -> str:
    """A hidden sibling of `out` for one process: `.NAME.TAG-PID`."""
    return os.path.join(
        os.path.dirname(out), f".{os.path.basename(out)}.{tag}-{os.getpid() if pid is None else pid}"
    )


def _recover_export_leftovers(out: str) -> None:
    """Tidy what a killed export left beside `out`: its half-written folder goes (`paths.tmp_path` removes
    its own; `export-tmp` is an earlier version's name); a folder it had moved aside to swap in the new one
    comes back when `out` is missing (killed between the two renames)."""
    parent, name = os.path.dirname(out), os.path.basename(out)
    for entry in sorted(os.listdir(parent)):
        m = re.fullmatch(re.escape(f".{name}.") + r"export-(tmp|old)-(\d+)", entry)
        if not m or int(m.group(2)) == os.getpid() or paths.pid_alive(int(m.group(2))):
            continue
        path = os.path.join(parent, entry)
        if m.group(1) == "old" and not os.path.exists(out):
            os.rename(path, out)
            print(
                f"alignx export: warning: restored {out} from {path} (an export was killed while replacing it)",
                file=sys.stderr,
            )
        else:
            shutil.rmtree(path, ignore_errors=True)


def _export_failed(out: str, e: OSError) -> CheckpointError:
    """The one line of an export whose folder beside `out` could not be written (`out` left as it was)."""
    where = f": {e.filename}" if e.filename else ""
    return CheckpointError(f"--out {out}: export failed ({e.strerror or e}{where}); {out} is unchanged")


def _refuse_own_folder(out: str, checkpoint: str, res: ResolvedCheckpoint) -> None:
    """A CheckpointError where `out` (real path or URL) is `checkpoint` or holds a folder the export reads:
    publishing the export replaces `out` whole, and --overwrite would put an HF config.json over the run's."""

    if paths.is_url(out) == paths.is_url(checkpoint) and paths.place(out) == paths.place(checkpoint):
        raise CheckpointError(f"--out {out}: is the --checkpoint folder itself; export into another folder")
    read = (checkpoint, res.config_dir, res.params_dir, res.tokenizer_dir, res.head_dir)
    if any(f and paths.within(f, out) for f in read):
        raise CheckpointError(
            f"--out {out}: is or holds a folder of --checkpoint {checkpoint}, which the export would "
            "replace; export into another folder"
        )


def _export_target(out: str, source: str, overwrite: bool) -> tuple[list[str], set[str]]:
    """(entries of `out`, the files a previous export wrote there), after checking that `out` may be
    written: absent, empty, an export of the same `source`, or anything with `overwrite`."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise CheckpointError(f"--out {out}: is a file, not a folder")
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"--out {out}: cannot create {e.filename or parent} ({e.strerror})") from None
    _recover_export_leftovers(out)
    # the folder the export is written in beside `out`: one that cannot be made fails now, not after the
    # checkpoint is read, and on every process of a job (the others had exited 0 beside process 0's error)
    probe = paths.tmp_path(out)
    shutil.rmtree(probe, ignore_errors=True)
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as e:
        raise _export_failed(out, e) from None
    if not os.path.isdir(out) or not os.listdir(out):
        return [], set()
    entries = sorted(os.listdir(out))
    return entries, _check_target(out, entries, read_export_manifest(out), source, overwrite)


def _check_target(
    out: str, entries: list[str], manifest: dict | None, source: str, overwrite: bool
) -> set[str]:
    """The files an earlier export listed in `manifest`, after checking that the folder `out` (its
    `entries`, not empty; local or a bucket's) may be written: an export of the same `source`, or
    anything with `overwrite`, but never one holding weights no export wrote."""
    own = {os.path.basename(str(f)) for f in (manifest or {}).get("files", [])}
    # weights no earlier export here wrote (another model's), which transformers would load instead of
    # the export or with it: refused here, before anything is read, on every process of a job
    foreign = [e for e in entries if WEIGHT_FILE.fullmatch(e) and e not in own]
    if foreign and (overwrite or manifest is not None):
        raise CheckpointError(
            f"--out {out}: holds {paths.listing(foreign)}, weights no export wrote, which transformers would "
            "load instead of the export or with it; remove them or choose another folder"
        )
    # by place: `gs://b/w/` (as an earlier version recorded it) is the export of `gs://b/w`
    if not overwrite and (manifest is None or not paths.same_place(manifest.get("source"), source)):
        if manifest is not None:
            raise CheckpointError(
                f"--out {out}: holds an export of {manifest.get('source')}; pass --overwrite to "
                "replace its files, or choose another folder"
            )
        raise CheckpointError(
            f"--out {out}: not empty and not an alignx export (holds {paths.listing(entries)}); pass --overwrite "
            "to replace the files an export writes (the others are kept), or choose an empty folder"
        )
    return own


def _kept(out: str, entries: list[str], own: set[str], files: list[str]) -> list[str]:
    """The entries of `out` an export writing `files` keeps: neither its own nor an earlier export's
    (those go); refused when one is weights, which transformers would load instead of the export."""
    keep = [e for e in entries if e not in own and e not in files]
    stale = [e for e in keep if WEIGHT_FILE.fullmatch(e)]
    if stale:  # transformers would load them instead of the export (model.safetensors beats an index)
        raise CheckpointError(
            f"--out {out}: holds {paths.listing(stale)}, weights this export does not write, which "
            "transformers would load instead of it or with it; remove them or choose another folder"
        )
    # another tokenizer's files beside this export's (a chat_template.jinja, a special_tokens_map.json)
    # override its chat template and eos; where the export writes no tokenizer they are the user's, kept
    other = [e for e in keep if e in TOKENIZER_FILES] if any(f in TOKENIZER_FILES for f in files) else []
    if other:
        raise CheckpointError(
            f"--out {out}: holds {paths.listing(other)}, tokenizer files this export does not write, which "
            "transformers would load with its tokenizer; remove them or choose another folder"
        )
    return keep


def _link_or_copy(src: str, dst: str) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)  # the same data under a second name: nothing is copied or moved
    except OSError:
        shutil.copy2(src, dst)


def _publish(tmp: str, out: str, keep: list[str]) -> None:
    """Make the complete export folder `tmp` the folder `out`, carrying `out`'s `keep` entries over.

    `out` is replaced by two renames, so it is at every moment either the old folder or the new one;
    a kill between them leaves the old one beside it, put back by the next export."""
    for name in keep:
        src, dst = os.path.join(out, name), os.path.join(tmp, name)
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)
    if os.path.isdir(out):
        shutil.copymode(out, tmp)  # the folder's permissions stay the user's
        old = _beside(out, "export-old")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def _write_export(args, res: ResolvedCheckpoint, model: Decoder, head, tmp: str, source: str) -> list[str]:
    """Every file of the export into the fresh folder `tmp`; returns their names."""
    from alignx_jax import model_card
    from alignx_jax.models import preference_head as ph

    if getattr(args, "peft", False):  # the adapters alone, for peft.PeftModel on the base model
        base, revision = peft_base(args.checkpoint, res)
        files = save_peft(model, tmp, base_model_name_or_path=base, revision=revision, dtype=args.dtype)
        files += copy_tokenizer(res.tokenizer_dir, tmp)
        fmt = trained_prompt_format(args.checkpoint)  # recorded as a full export's is
        write_export_manifest(tmp, files, source=source, step=res.step, prompt_format=fmt)
        return files
    files = save_hf(
        model,
        tmp,
        dtype=args.dtype,
        shard_size=args.shard_size,
        tokenizer_dir=res.tokenizer_dir,
        source=source,
        step=res.step,
        base_dir=res.config_dir,  # the base model's generation_config.json, kept as it is
    )
    if res.head_dir is not None:
        if res.step is None:  # an imported model checkpoint: the head files as they came in
            _copy_head_files(res.head_dir, tmp)
        else:
            # float32 always: the head is tiny, --dtype is the policy's; how it was fit, from the run's pba.mode
            pba = (model_card.read_run_config(args.checkpoint) or {}).get("pba") or {}
            training = pba.get("mode") if pba.get("mode") in ph.HEAD_TRAININGS else None
            ph.save_head(head, None, tmp, training=training)
        files += [ph.HEAD_WEIGHTS_FILE, ph.HEAD_CONFIG_FILE]
    files.append(
        model_card.write_card(
            tmp,
            checkpoint=args.checkpoint,
            config_dir=res.config_dir,
            source=source,
            step=res.step,
            dtype=read_hf_config(tmp).get("dtype", "float32"),
            has_head=res.head_dir is not None,
            results_files=getattr(args, "results", None),
            name=os.path.basename(paths.absolute(args.out).rstrip("/")),
            scored_this=lambda model: _export_of(model, source, res.step),
        )
    )
    write_export_manifest(
        tmp,
        files,
        source=source,
        step=res.step,
        prompt_format=trained_prompt_format(args.checkpoint),
        base_model=model_card.card_base(args.checkpoint, res.config_dir)[0],
    )
    return files


def _export_of(model: str, source: str, step: int | None) -> bool:
    """Whether the folder `model` (an `alignx eval` results file's) may be an export of `source` at `step`:
    false only for an export folder whose manifest names another checkpoint or step; a bucket folder is not
    read (the card would otherwise reach for the network)."""
    manifest = None if paths.is_url(model) else read_export_manifest(model)
    if manifest is None:
        return True
    return paths.same_place(manifest.get("source"), source) and manifest.get("step") == step


def peft_base(checkpoint: str, res: ResolvedCheckpoint) -> tuple[str, str | None]:
    """adapter_config.json's (`base_model_name_or_path`, `revision`): the base the run recorded in
    W/reference (else its `model.hf_path`) when that is a hub id (with its `@revision`, else None) or an HF
    folder transformers loads, else the folder of the base weights themselves (a workdir's `reference`:
    e.g. for a run on an `alignx import` checkpoint)."""
    from alignx_jax import model_card
    from alignx_jax.hub import parse_hub_id

    base = model_card.read_base_info(os.path.join(checkpoint, "reference")).get("base_model")
    if not isinstance(base, str) or not base:  # a workdir written before W/reference recorded it
        base = (model_card.read_run_config(checkpoint) or {"model": {}})["model"].get("hf_path")
    if isinstance(base, str) and base:
        hub = parse_hub_id(base)
        if hub is not None:  # the revision too: peft loads the base's main branch, which moves on
            return hub
        loadable = holds_safetensors(base) and os.path.isfile(os.path.join(base, "config.json"))
        if loadable:
            return os.path.abspath(base), None
    folder = (
        paths.absolute(res.config_dir) if paths.is_url(res.config_dir) else os.path.abspath(res.config_dir)
    )
    return folder, None


def trained_prompt_format(folder: str) -> str | None:
    """The `data.prompt_format` the model in `folder` was trained with, None when not recorded; the
    one owner of this lookup (`alignx export` records it, `alignx eval`/`generate` default to it).

    Looked up, in order: the export manifest's `prompt_format` (`EXPORT_MANIFEST`, an exported folder);
    the run config `config.json` of `folder` itself (a training workdir) or of the manifest's local
    `source` (the workdir the export came from), when it holds `data.prompt_format`; the `prompt_format`
    an `alignx import` checkpoint kept of its export (`model_card.BASE_INFO`). `folder` may be a
    bucket URL (`alignx export gs://.../W`)."""
    from alignx_jax import model_card
    from alignx_jax.data.prompts import PROMPT_FORMATS

    manifest = read_export_manifest(folder) or {}
    if manifest.get("prompt_format") in PROMPT_FORMATS:
        return str(manifest["prompt_format"])
    source = manifest.get("source")
    # a bucket source is not read: eval/generate would otherwise reach for the network for a default
    source = source if isinstance(source, str) and source and not paths.is_url(source) else None
    for run_dir in (folder, source):
        if run_dir is None:
            continue
        data = (model_card.read_run_config(run_dir) or {}).get("data", {})
        if data.get("prompt_format") in PROMPT_FORMATS:
            return str(data["prompt_format"])
    imported = model_card.read_base_info(folder).get("prompt_format")
    return str(imported) if imported in PROMPT_FORMATS else None


def _export_source(checkpoint: str) -> str:
    """The checkpoint as the export manifest names it: its place (a URL stays a URL, less a trailing '/')."""
    return paths.place(checkpoint)


def _export_inputs(checkpoint: str, res: ResolvedCheckpoint):
    """(model, head or None), both read and verified (finite, checksums where saved) before anything
    is written."""
    from alignx_jax.models import preference_head as ph

    model = load_checkpoint(checkpoint, res.step)
    head = None
    if res.head_dir is not None:
        head = ph.load_head(res.head_dir)[0] if res.step is None else load_checkpoint_head(res)[0]
    return model, head


def _bucket_target(url: str, source: str, overwrite: bool) -> tuple[list[str], set[str]]:
    """`_export_target` of a bucket folder: (its entries, the files earlier exports wrote there), after
    the same checks on its listing and manifest (an unfinished upload's `EXPORT_UPLOAD`: a rerun of it
    needs no --overwrite and finds no foreign weights)."""
    out = paths.path(url)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {url}: is a file, not a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return [], set()
    manifest = read_export_manifest(url) or read_export_manifest(url, EXPORT_UPLOAD)
    return entries, _check_target(url, entries, manifest, source, overwrite)


def _check_flags(args) -> None:
    """The flags' own errors, before the checkpoint is resolved and read (minutes for a large model)."""
    for flag, value in (("--checkpoint", args.checkpoint), ("--out", args.out)):
        if not value:  # not the working directory in its place
            raise CheckpointError(f"{flag}: an empty path; name a folder")
    try:
        parse_size(getattr(args, "shard_size", "5GB"))
    except CheckpointError as e:
        raise CheckpointError(f"--shard-size: {e}") from None
    results = getattr(args, "results", None)
    if results and getattr(args, "peft", False):  # an adapter folder has no model card to put them in
        raise CheckpointError("--results: --peft writes no model card; export without --peft for one")
    if results:
        from alignx_jax import model_card

        model_card.find_results(args.checkpoint, results)  # each given file must be eval results


def _check_peft(args, res: ResolvedCheckpoint) -> None:
    """--peft on a checkpoint without adapters, refused from its metadata before its arrays are read."""
    if getattr(args, "peft", False) and not has_lora_adapters(res):
        raise CheckpointError("--peft: the checkpoint has no LoRA adapters (train with model.lora.rank > 0)")


def _export_to_bucket(args) -> int:
    """`alignx export --out gs://...`: the export is written to a local temporary folder, then uploaded
    file by file. The target is checked as a local one (`_check_target`, `_kept`). `EXPORT_UPLOAD` goes
    up first and the old manifest is deleted, the new one uploaded last, so a folder without
    `alignx_export.json` is an unfinished upload; an earlier export's files this one does not write are
    removed, the others kept."""
    import tempfile

    out = paths.path(args.out)
    res = resolve_checkpoint(args.checkpoint, args.step)
    source = _export_source(args.checkpoint)
    _check_peft(args, res)
    main = paths.is_main_process()
    entries, own, problem = [], set(), None
    if main:
        try:
            _refuse_own_folder(args.out, args.checkpoint, res)
            entries, own = _bucket_target(args.out, source, bool(getattr(args, "overwrite", False)))
        except CheckpointError as e:
            problem = e
        except Exception as e:  # the bucket client's own errors (a 403, no credentials): one line, all stop
            problem = CheckpointError(f"--out {args.out}: cannot list it ({one_line(e)})")
    distributed.agree(problem, "--out")  # a refused --out stops every process before the collective read
    model, head = _export_inputs(args.checkpoint, res)

    def upload() -> list[str]:  # on process 0 alone; the files written
        with tempfile.TemporaryDirectory(prefix="alignx-export-") as local:
            tmp = os.path.join(local, "export")
            files = _write_export(args, res, model, head, tmp, source)
            _kept(args.out, entries, own, files)  # refuses other weights before the bucket is touched
            names = sorted(os.path.relpath(os.path.join(d, n), tmp) for d, _, ns in os.walk(tmp) for n in ns)
            manifest = {**(read_export_manifest(tmp) or {}), "files": sorted(own | set(names))}
            try:
                out.mkdir(parents=True, exist_ok=True)
                # first: a kill from here on leaves an unfinished upload that a rerun may replace as its own
                (out / EXPORT_UPLOAD).write_text(
                    json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8"
                )
                (out / EXPORT_MANIFEST).unlink(missing_ok=True)
                for name in sorted(own - set(names) - {EXPORT_MANIFEST}):  # e.g. shards of another count
                    if name in entries:
                        (out / name).unlink(missing_ok=True)
                for name in [n for n in names if n != EXPORT_MANIFEST] + [EXPORT_MANIFEST]:
                    (out / name).parent.mkdir(parents=True, exist_ok=True)
                    with open(os.path.join(tmp, name), "rb") as f:
                        (out / name).write_bytes(f.read())
                (out / EXPORT_UPLOAD).unlink()
            except OSError as e:
                raise CheckpointError(
                    f"--out {args.out}: upload failed ({e.strerror or one_line(e)}); run the export again"
                ) from None
        return files

    files = distributed.write_on_main(upload, "--out")  # a failed upload fails every process
    if not main:
        return 0
    where = f" step {res.step}" if res.step is not None else ""
    print(f"exported {args.checkpoint}{where} -> {args.out} ({len(files)} files uploaded)")
    return 0


def cli_export(args) -> int:
    """`alignx export`: verify the checkpoint, write the HF folder beside `--out`, rename it into place.

    `--out` must be absent, empty or an export of the same checkpoint; `--overwrite` allows any folder.
    Files of `--out` that no export wrote are kept (hard links into the new folder), never deleted."""

    _check_flags(args)
    if paths.is_url(args.out):
        return _export_to_bucket(args)
    out = os.path.realpath(args.out)  # a link to a folder: the folder is replaced, the link kept
    res = resolve_checkpoint(args.checkpoint, args.step)
    source = _export_source(args.checkpoint)
    _check_peft(args, res)
    # a multi-process job (launch/local.sh, a pod): every process reads the checkpoint, process 0 writes
    main = paths.is_main_process()
    entries, own, problem = [], set(), None
    if main:
        try:
            _refuse_own_folder(out, args.checkpoint, res)
            entries, own = _export_target(out, source, bool(getattr(args, "overwrite", False)))
        except CheckpointError as e:
            problem = e
    distributed.agree(problem, "--out")  # a refused --out stops every process before the collective read
    model, head = _export_inputs(args.checkpoint, res)

    def write() -> None:  # on process 0 alone
        tmp = paths.tmp_path(out)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            files = _write_export(args, res, model, head, tmp, source)
            _publish(tmp, out, _kept(out, entries, own, files))
        except OSError as e:  # a full disk, a permission: `out` is as it was
            shutil.rmtree(tmp, ignore_errors=True)
            raise _export_failed(out, e) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    distributed.write_on_main(write, "--out")  # a failed write fails every process
    if not main:
        return 0
    where = f" step {res.step}" if res.step is not None else ""
    extra = " (with preference head)" if res.head_dir is not None else ""
    print(f"exported {args.checkpoint}{where} -> {args.out}{extra}")
    return 0
