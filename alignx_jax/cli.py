"""`alignx` command line: one sub-command per job, each handled in the module that owns it.

The argument definitions here are the contract (README documents them); handlers are imported
lazily so that `alignx --help` and data commands start fast. Any `AlignXError` becomes one line
on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Sequence

from alignx_jax.errors import AlignXError, ConfigError
from alignx_jax.hardware import AUTO, COMPUTE_DTYPES, CPU_MATMULS, MATMUL_PRECISIONS

# sub-command -> "module:function(args) -> int | None"
HANDLERS: dict[str, str] = {
    "import": "alignx_jax.export:cli_import",
    "import --gguf": "alignx_jax.models.gguf:cli_import",
    "export": "alignx_jax.export:cli_export",
    "data check": "alignx_jax.data.check:cli_check",
    "data prepare": "alignx_jax.data.sources:cli_prepare",
    "data split": "alignx_jax.data.split:cli_split",
    "data contrast": "alignx_jax.data.contrast:cli_contrast",
    "synth": "alignx_jax.data.synth:cli_synth",
    "train": "alignx_jax.train.cli:cli_train",
    "eval": "alignx_jax.evaluate.cli:cli_eval",
    "generate": "alignx_jax.generate:cli_generate",
    "predict-preferences": "alignx_jax.pba.predict:cli_predict_preferences",
    "plan": "alignx_jax.plan.cli:cli_plan",
    "demo": "alignx_jax.demo:cli_demo",
}


class _Parser(argparse.ArgumentParser):
    """A usage error (an unknown flag, an invalid choice, a missing argument) is one line on stderr,
    `alignx eval: error: ... (see alignx eval --help)`, and argparse's exit status 2, not its usage block.
    Sub-parsers are of this class too (`add_subparsers` makes them of the parent's class); `--help`
    still prints the whole help."""

    def add_subparsers(self, **kwargs):
        self.commands = super().add_subparsers(**kwargs)
        return self.commands

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _seed(text: str) -> int:
    """A `--seed` value: numpy's seeds are non-negative (a negative one was a traceback at the first draw)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


def _path(text: str) -> str:
    """A path flag's value with `~` or `~user` at its start as that home (URLs and hub ids start otherwise):
    a shell leaves `--out=~/x` as written (a `~` after `=`), and a command made a `./~` folder."""
    return os.path.expanduser(text) if text.startswith("~") else text


def _named_path(text: str) -> str:
    """A `NAME=PATH` flag's value (`--benchmark`) with `_path`'s `~` expanded in its PATH."""
    name, sep, where = text.partition("=")
    return f"{name}{sep}{_path(where)}" if sep else text


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        dest="config_path",
        type=_path,
        required=True,
        help="ml-collections config file (configs/*.py); then --config.KEY=VALUE (or --config.KEY VALUE) "
        "overrides",
    )


def _dtype_arg(p: argparse.ArgumentParser, help_text: str, auto: bool = False) -> None:
    """`--dtype` of the commands that load a model in a chosen dtype (default: theirs, as `help_text` says);
    `auto` (scoring and generation): bfloat16 on GPU/TPU, CPUs with AMX, AMD CPUs with AVX-512-BF16, else float32."""
    choices = [*COMPUTE_DTYPES, *([AUTO] if auto else [])]
    if auto:
        help_text += (
            "; auto: bfloat16 on GPU/TPU, on CPUs with AMX and AMD ones with AVX-512-BF16, else float32"
        )
    p.add_argument("--dtype", default=None, choices=choices, help=help_text)


def _matmul_args(p: argparse.ArgumentParser) -> None:
    """How the commands that run a model multiply: `--cpu-matmul` and `--matmul-precision` (a training
    config's `model.cpu_matmul` and `model.matmul_precision`)."""
    p.add_argument(
        "--cpu-matmul",
        default=AUTO,
        choices=CPU_MATMULS,
        help="the library XLA's CPU backend calls for matrix products (CPU only); auto: oneDNN for float32 "
        "models of hidden size >= 256 on Intel CPUs with AVX-512 (not for generation), else YNNPACK; onednn "
        "is refused on other CPUs",
    )
    p.add_argument(
        "--matmul-precision",
        default=AUTO,
        choices=MATMUL_PRECISIONS,
        help="jax.default_matmul_precision of the model's products; auto: highest for a float32 model on a "
        "GPU/TPU (their default rounds float32 inputs: TF32, one bfloat16 pass), else default",
    )


def _add_import(sub) -> None:
    p = sub.add_parser("import", help="Hugging Face folder or GGUF file -> orbax checkpoint")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--hf", type=_path, help="HF model folder (config.json + safetensors) or hub id org/name[@revision]"
    )
    src.add_argument(
        "--gguf", type=_path, help="llama.cpp GGUF file (llama/qwen2; dequantized, tokenizer rebuilt)"
    )
    p.add_argument(
        "--out", type=_path, required=True, help="output checkpoint folder: new, empty or an earlier import's"
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into any folder (files an import does not write are kept)",
    )


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="orbax checkpoint or training workdir -> Hugging Face folder")
    p.add_argument(
        "--checkpoint",
        type=_path,
        required=True,
        help="checkpoint folder (from `import`) or a training workdir",
    )
    p.add_argument("--step", type=int, default=None, help="workdir step to export (default: latest)")
    p.add_argument("--out", type=_path, required=True, help="output HF folder")
    _dtype_arg(p, "tensor dtype in the safetensors (default: the checkpoint's)")
    p.add_argument(
        "--results",
        action="append",
        type=_path,
        default=None,
        metavar="RESULTS.json",
        help="`alignx eval` results for the model card's evaluation table (repeatable; default: those "
        "found in the workdir)",
    )
    p.add_argument(
        "--shard-size",
        default="5GB",
        help="max safetensors shard size, e.g. 5GB, 200MB (as transformers' max_shard_size: GB/MB/TB decimal, "
        "GiB/MiB/TiB 1024-based, Gb/Mb bits)",
    )
    p.add_argument(
        "--peft",
        action="store_true",
        help="a model.lora run: write its adapters as a PEFT adapter folder (adapter_config.json + "
        "adapter_model.safetensors, for peft.PeftModel.from_pretrained on the base model) instead of "
        "the merged model",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="export into a non-empty folder that is not an export of this model: replace the files "
        "an export writes, leave the others",
    )


def _add_data(sub) -> None:
    pdata = sub.add_parser("data", help="data tools: check, prepare, split, contrast")
    dsub = pdata.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    p = dsub.add_parser("check", help="validate AlignX rows or a benchmark file; print counts")
    p.add_argument("path", type=_path, help="parquet/JSONL/JSON file or folder")
    p.add_argument("--kind", default="auto", choices=["auto", "alignx", "p-soups", "uf-p-4", "prism"])
    p.add_argument(
        "--strict",
        action="store_true",
        help="warnings (legal but useless rows, e.g. chosen == rejected) are errors: exit 1",
    )
    p = dsub.add_parser("prepare", help="AlignX parquet -> TFDS array_record dataset")
    p.add_argument("--source", type=_path, required=True, help="parquet/JSONL/JSON file or folder")
    p.add_argument("--out", type=_path, required=True, help="TFDS data_dir to write")
    p.add_argument(
        "--skip-bad-rows", action="store_true", help="drop malformed rows (counted) instead of failing"
    )
    p = dsub.add_parser("split", help="split a data set into DIR/train and DIR/test")
    p.add_argument("path", type=_path)
    p.add_argument("--by", default="prompt", choices=["prompt", "user", "row"])
    p.add_argument("--test-fraction", type=float, default=0.5)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--out", type=_path, required=True)
    p = dsub.add_parser(
        "contrast",
        help="a two-persona file (P-SOUPS) plus each pair under the other persona with chosen and rejected swapped",
    )
    p.add_argument("path", type=_path, help="JSON list or JSONL file of exactly two opposite personas")
    p.add_argument(
        "--seed", type=_seed, default=0, help="which other-persona row lends each contrast row its context"
    )
    p.add_argument("--out", type=_path, required=True, help="file to write (the input's format)")
    p.add_argument(
        "--twins",
        action="store_true",
        help="each row (seeded order) followed by its contrast row: train with data.twins=true and an "
        "even batch so every batch holds whole twins",
    )
    p.add_argument(
        "--originals",
        type=int,
        default=1,
        help="each row this many times, then its contrast row once (not with --twins): at 2, a preference "
        "the two personas share keeps a third of its weight (the contrast rows alone cancel it)",
    )


def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="write synthetic AlignX-schema users (parquet)")
    p.add_argument("--out", type=_path, required=True)
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--pairs-per-user", type=int, default=4)
    p.add_argument("--seed", type=_seed, default=0)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="DPO training (ICA / PBA / non-personalized) from a config")
    _config_args(p)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="alignment accuracy on AlignX benchmarks")
    p.add_argument(
        "--model",
        type=_path,
        required=True,
        help="HF folder (or hub id org/name[@revision], or .gguf file) of the policy",
    )
    p.add_argument(
        "--reference",
        type=_path,
        default="none",
        help="HF folder (or hub id) of the reference, or 'none' (the default: the policy's own log-probs, "
        "the paper's base-model rows)",
    )
    p.add_argument(
        "--benchmark",
        action="append",
        type=_named_path,
        required=True,
        metavar="NAME=PATH",
        help="alignx|p-soups|uf-p-4|prism=PATH (repeatable)",
    )
    p.add_argument(
        "--method",
        default="ica",
        choices=["none", "ica", "pba"],
        help="the prompt: none (no persona), ica (the persona in context, default) or pba (a profile)",
    )
    p.add_argument(
        "--persona",
        default=None,
        help="ugc|pair|demo|p, comma-separated for several (alignx default: all four); for the prompts that "
        "show a persona: --method ica, --method pba --preference predicted",
    )
    p.add_argument(
        "--preference",
        default=None,
        choices=["golden", "predicted", "profile"],
        help="PBA's P̃ (--method pba only): the row's Preference Direction, else its `profile` (golden, the "
        "default, as PBA training's golden), the model's head (predicted) or the row's `profile` text as the "
        "release evaluates (profile)",
    )
    p.add_argument(
        "--flip",
        default=None,
        help="comma-separated dimension indices or labels to reverse in P̃ (--method pba)",
    )
    p.add_argument(
        "--prompt-format",
        default=None,
        choices=["chat", "paper", "release"],
        help="prompt rendering (default: the format the model was trained with when its folder records "
        "it, a release-trained model with paper; else chat). paper = the release's evaluation strings, "
        "release = its training strings",
    )
    p.add_argument(
        "--reference-prompt",
        default="same",
        choices=["same", "ica"],
        help="the prompt the reference is scored on: the policy's (same) or the row's ICA prompt (ica, "
        "as the release's reference script does, also for PBA; needs --reference or --reference-scores)",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="score a seeded sample of N rows per --benchmark, balanced across personas; a folder's N are "
        "taken from its files in turn (UF-P-4: about N/4 of each file), the same rows every run",
    )
    p.add_argument(
        "--reference-scores",
        type=_path,
        default=None,
        metavar="FILE.jsonl",
        help="the reference's log-probs from an earlier `alignx eval --per-example` of it (instead of "
        "--reference)",
    )
    p.add_argument(
        "--no-share-prompt",
        action="store_true",
        help="score chosen and rejected as two rows (default: one row per pair, the prompt once)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--max-length",
        type=int,
        default=8192,
        help="prompts and responses are each left-truncated to this minus 513 tokens (minus half of it "
        "below 1026), as the release evaluates",
    )
    p.add_argument("--beta", type=float, default=0.1)
    _dtype_arg(
        p,
        "parameter/compute dtype for scoring (default float32; bfloat16 for 7-8B models)",
        auto=True,
    )
    _matmul_args(p)
    p.add_argument("--per-example", type=_path, default=None, metavar="FILE.jsonl")
    p.add_argument("--out", type=_path, required=True, metavar="RESULTS.json")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="sample responses with a KV cache")
    p.add_argument(
        "--model",
        type=_path,
        required=True,
        help="HF folder, hub id (org/name[@revision]), .gguf file, checkpoint or workdir",
    )
    _dtype_arg(
        p,
        "parameter/compute dtype (default: float32 for HF folders, the stored dtype for checkpoints)",
        auto=True,
    )
    _matmul_args(p)
    p.add_argument("--prompt", action="append", default=None, help="prompt text (repeatable for a batch)")
    p.add_argument(
        "--benchmark",
        type=_named_path,
        default=None,
        metavar="NAME=PATH",
        help="generate for every row of a benchmark file (alignx|p-soups|uf-p-4|prism=PATH) into --out",
    )
    p.add_argument(
        "--out",
        type=_path,
        default=None,
        metavar="FILE.jsonl",
        help="--benchmark output (appended, resumable)",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="--benchmark: a seeded sample of N rows balanced across personas (a folder's files in turn), "
        "eval --limit's rows",
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help="--benchmark: prompts per generation batch (default 8)"
    )
    p.add_argument(
        "--prompt-format",
        default=None,
        choices=["chat", "paper", "release"],
        help="default: the format the model was trained with when recorded (release -> paper), else chat "
        "for --prompt and paper for --benchmark",
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=8192,
        help="prompts are left-truncated to this minus 513 tokens (minus half of it below 1026) as the "
        "release evaluates; the paper format puts its BOS back in front",
    )
    p.add_argument("--persona", type=_path, default=None, help="JSON file with the persona fields of a row")
    p.add_argument("--method", default="none", choices=["none", "ica", "pba"])
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--greedy", action="store_true", help="argmax (the sampling flags do not apply)")
    p.add_argument("--temperature", type=float, default=None, help="default 0.9 (the paper's)")
    p.add_argument("--top-k", type=int, default=None, help="default 10 (the paper's); 0: no top-k filter")
    p.add_argument("--top-p", type=float, default=None, help="default 0.95 (the paper's)")
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="in [0, 2**32), default 0; a row's sample depends on it and the row alone",
    )
    p.add_argument("--json", action="store_true")


def _add_predict_preferences(sub) -> None:
    p = sub.add_parser("predict-preferences", help="predict P̃ and the profile text with the preference head")
    p.add_argument(
        "--model",
        type=_path,
        required=True,
        help="HF folder with the preference head beside the policy (or hub id org/name[@revision], or "
        "gs:// folder), as eval's --model",
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--persona", type=_path, help="JSON file with one row's persona fields")
    g.add_argument("--data", type=_path, help="data set to annotate")
    p.add_argument("--out", type=_path, default=None, help="JSONL output for --data")
    p.add_argument("--json", action="store_true")


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="compile the train step ahead of time and report memory per device")
    _config_args(p)
    p.add_argument("--topology", default=None, help="v5p-64 | 8xH100 | ... (default: the config's)")
    p.add_argument(
        "--compiler",
        default=None,
        choices=("auto", "tpu", "cpu"),
        help="tpu: the TPU compiler (needs libtpu, no TPU); cpu: CPU stand-ins; auto (default: the "
        "config's plan.compiler): tpu for a TPU topology where libtpu is installed, else cpu",
    )
    p.add_argument("--json", type=_path, default=None, metavar="OUT.json")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="also list every parameter: name, shape, partition spec and per-device shape",
    )


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="small-scale reproduction: synth -> train -> export -> eval -> report")
    p.add_argument(
        "--out",
        type=_path,
        default=None,
        help="output folder (default runs/demo, with --real runs/demo-real)",
    )
    p.add_argument(
        "--real",
        action="store_true",
        help="the real SmolLM2-135M-Instruct on a P-SOUPS file split by prompt (see README)",
    )
    p.add_argument("--quick", action="store_true", help="tiny budgets (about a minute), for tests")
    p.add_argument(
        "--model",
        type=_path,
        default=None,
        help="with --real: the model to personalize instead of the shipped SmolLM2, an HF folder, "
        "a hub id, a .gguf file or a gs:// folder (as model.hf_path)",
    )
    p.add_argument(
        "--p-soups",
        type=_path,
        default=None,
        help="P-SOUPS file (default: shared/benchmarks/p-soups/student_phd.json in the folder that holds this "
        "repository, not the working directory's ../shared)",
    )
    p.add_argument("--seed", type=_seed, default=0)


_SUBCOMMANDS = (
    _add_import,
    _add_export,
    _add_data,
    _add_synth,
    _add_train,
    _add_eval,
    _add_generate,
    _add_predict_preferences,
    _add_plan,
    _add_demo,
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="alignx", description="AlignX personalized alignment in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _SUBCOMMANDS:  # in `alignx --help` order
        add(sub)
    return parser


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub-)sub-command's parser that parsed `args`: `alignx data check`'s for `data check`."""
    for name in (args.command, getattr(args, "data_command", None)):
        commands = getattr(parser, "commands", None)
        if commands is None or name not in commands.choices:
            break
        parser = commands.choices[name]
    return parser


def _handler_for(args: argparse.Namespace):
    key = args.command if args.command != "data" else f"data {args.data_command}"
    if args.command == "import" and args.gguf:
        key = "import --gguf"
    module_name, fn_name = HANDLERS[key].split(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, fn_name)
    except (ImportError, AttributeError) as e:
        raise AlignXError(f"`alignx {key}` is not available in this build ({e})") from e


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # `--config.KEY=VALUE` / `--config.KEY VALUE` overrides are collected apart: argparse cannot know the
    # config's keys. They reach the handler as `--config.KEY=VALUE` strings.
    overrides, rest = [], argv
    if any(a.startswith("--config.") for a in argv):
        from alignx_jax.config import split_overrides  # imports ml_collections: only when there are overrides

        try:
            overrides, rest = split_overrides(argv)
        except AlignXError as e:
            print(f"alignx: error: {e}", file=sys.stderr)
            return 1
    args, unknown = parser.parse_known_args(rest)
    if unknown:  # named by the sub-command's parser, whose --help lists its flags
        _command_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = overrides
    if overrides and args.command not in ("train", "plan"):
        _command_parser(parser, args).error(
            f"--config.* overrides only apply to train and plan, not {args.command}"
        )
    old_term = _exit_on_sigterm(_joins_a_job(overrides)) if args.command == "train" else False
    old_stop = _stop_at_once() if args.command in STOP_AT_ONCE else None
    try:
        handler = _handler_for(args)
        _refuse_one_process_command_in_a_job(args)
        if _join_distributed_job() and old_stop is not None:
            _stop_at_once()  # jax.distributed.initialize's preemption notifier took SIGTERM over: a run went on
        _use_compile_cache(args)
        code = handler(args)
    except AlignXError as e:
        print(f"alignx: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # an output the system refuses (a read-only folder, a file where a folder goes)
        where = f"{e.filename}: " if e.filename else ""
        # a bucket's refusal is several lines ("Forbidden: ...\n403 ..."): one line
        print(f"alignx: error: {where}{' '.join(str(e.strerror or e).split())}", file=sys.stderr)
        return 1
    except ImportError as e:  # a bucket's client library (gcsfs for gs://) missing: epath's words, one line
        if not any(client in str(e) for client in ("gcsfs", "s3fs", "adlfs", "Google Storage")):
            raise
        print(
            f"alignx: error: {' '.join(str(e).split())} (pip install -e '.[gcs]' for gs://)", file=sys.stderr
        )
        return 1
    except KeyboardInterrupt:
        print("alignx: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        lost = _peer_lost(e)
        if lost is None:
            raise
        # the others' collectives fail with a long traceback (gloo's) when one process of a job is stopped
        print(
            f"alignx {args.command}: another process of the job stopped ({lost}); its log says why",
            file=sys.stderr,
        )
        sys.stdout.flush()
        sys.stderr.flush()
        # not a return: JAX's shutdown barrier at exit waits for the gone process until its heartbeat
        # timeout (minutes), then aborts with a stack dump
        os._exit(1)
    finally:
        if old_term is not False:
            signal.signal(signal.SIGTERM, old_term if old_term is not None else signal.SIG_DFL)
        for signum, old in (old_stop or {}).items():
            signal.signal(signum, old if old is not None else signal.SIG_DFL)
    return int(code or 0)


# how a gloo collective (CPU) fails when a peer process is gone: its TCP pair's read or write error
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")


def _peer_lost(e: Exception) -> str | None:
    """The one-line cause when `e` is a gloo collective of a multi-process job that failed because another
    process of it went away (stopped by a signal, killed); None for any other error, and in one process."""
    text = " ".join(str(e).split())
    if "Gloo" not in text or not any(p in text for p in _PEER_LOST) or "jax" not in sys.modules:
        return None
    import jax

    if not jax.distributed.is_initialized() or jax.process_count() <= 1:
        return None
    return text[:300]


# commands whose outputs are written whole and renamed into place, or appended row by row and resumed
STOP_AT_ONCE = ("eval", "generate", "predict-preferences", "data", "synth", "import", "export")


def _stop_at_once() -> dict | None:
    """SIGINT/SIGTERM end a STOP_AT_ONCE command at once (one line; exit 130 / 143): it has nothing to
    save, and a KeyboardInterrupt raised inside JAX's garbage-collection callback would be printed and
    ignored, the run going on to exit 0. Returns the previous handlers (None off the main thread)."""

    def handler(signum, frame):
        say = "interrupted" if signum == signal.SIGINT else "stopped by SIGTERM"
        print(f"alignx: {say}; rerun the same command to resume or redo it", file=sys.stderr)
        sys.stderr.flush()
        os._exit(128 + signum)

    try:
        return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread
        return None


def _use_compile_cache(args: argparse.Namespace) -> None:
    """The persistent JAX compilation cache (`alignx_jax.compile_cache`) for the commands that compile:
    W/.jax_cache for `train` given `--config.workdir=W`, the user cache for eval and generate (`demo`
    sets its own, OUT/.jax_cache). `JAX_COMPILATION_CACHE_DIR` wins; `ALIGNX_COMPILE_CACHE=0` disables."""
    if args.command not in ("train", "eval", "generate"):
        return
    workdir = None
    if args.command == "train":
        given = [o.split("=", 1)[1] for o in args.overrides if o.startswith("--config.workdir=")]
        if not given or not given[-1]:
            return  # the workdir is in the config file: the train command applies the cache itself
        workdir = _path(given[-1])  # as the config's workdir (`config.expand_home`), not a `./~` cache
    from alignx_jax.compile_cache import use_compile_cache

    use_compile_cache(workdir)


# host-side writers of one folder: every process of a job would write it (import's orbax save refuses
# arrays of one host, prepare's lock refuses the second writer, synth, split and contrast write the same
# files from every process), and they use no other host's devices
ONE_PROCESS_COMMANDS = ("import", "data prepare", "synth", "data split", "data contrast")


def _refuse_one_process_command_in_a_job(args: argparse.Namespace) -> None:
    from alignx_jax import distributed

    name = " ".join(filter(None, (args.command, getattr(args, "data_command", None))))
    if name in ONE_PROCESS_COMMANDS and distributed.requested():
        raise ConfigError(
            f"alignx {name} runs as one process and this one is part of a multi-process job "
            "(launch/local.sh or ALIGNX_* variables); run it without the launcher"
        )


def _join_distributed_job() -> bool:
    """Every command joins the multi-process job a launcher describes (launch/local.sh, SLURM, a TPU pod:
    `alignx_jax.distributed`) before it touches a device; without those variables nothing is imported.
    True when this process joined one now."""
    from alignx_jax import distributed

    return distributed.requested() and distributed.initialize_from_env()


def _joins_a_job(overrides: Sequence[str]) -> bool:
    """Whether this `alignx train` is one process of a multi-process job: its environment says so
    (`distributed.requested()`, launch/local.sh) or `--config.train.distributed=true` does (how
    launch/tpu_pod.sh and launch/gpu_multihost.sh join the job)."""
    from alignx_jax import distributed

    given = [o.split("=", 1)[1] for o in overrides if o.startswith("--config.train.distributed=")]
    return distributed.requested() or (bool(given) and given[-1].strip().lower() in ("1", "true", "yes"))


def _exit_on_sigterm(multi_process: bool):
    """Until `alignx train` installs its own handler (it saves at the next step), a SIGTERM finds nothing
    to save: exit 0 instead of dying with 143. Returns the previous handler (False off the main thread).

    In a multi-process job (`_joins_a_job`) the signal is only recorded (`distributed.record_signal`):
    one process leaving alone would leave the others blocked in a collective until the coordinator's
    heartbeat timeout. The trainer's first agreed check sees it and every process exits 0 together
    ("received during start-up; nothing to save")."""
    from alignx_jax import distributed

    if multi_process:

        def handler(signum, frame):
            distributed.record_signal(signum)

    else:

        def handler(signum, frame):
            print("alignx train: SIGTERM received during start-up; nothing to save", file=sys.stderr)
            sys.stderr.flush()
            # not SystemExit: raised inside a GC callback (JAX's) it is printed and ignored, and the run
            # goes on
            os._exit(0)

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return False


def run() -> None:  # console-script entry point
    from alignx_jax.allocator import preload_for_cli

    try:
        # before anything else is imported: may re-execute this process with mimalloc preloaded
        preload_for_cli(sys.argv[1:])
    except AlignXError as e:
        print(f"alignx: error: {e}", file=sys.stderr)
        sys.exit(1)
    code = main()
    if code == 130:  # a second Ctrl-C cut a computation XLA's threads may still run: teardown crashed on it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
