"""The run config's one schema: every key's type, default, allowed values and one-line meaning
(`config_rules.validate_config` adds the rules a key lookup cannot do).

The sections are dataclasses (`RunConfig` holds them); `default_config()` turns them into the
`ml_collections.ConfigDict` every config file starts from (configs/base.py returns it), so a key
exists exactly when the schema names it. `check_types` checks a config against the schema (every
key present, no unknown key, each value of its field's type, each `Literal` field one of its values),
one `ConfigError` line for the first failure; `config_rules.validate_config` runs it, then the
cross-field rules.

A config read back from a workdir written by an older version may lack keys added since:
`merge_saved(saved)` lays its values over today's defaults, the one place such gaps are filled; code
that holds a config then reads every key by attribute, never with a `.get(key, default)` of its own.

Allowed values live with the code that owns them (`losses.PREFERENCE_LOSS_TYPES`,
`models.config.REMAT_POLICIES`, ...) and are turned into `Literal` types here; the trainer's own
choices (`METHODS`, `REFERENCE_MODES`, ...) are defined here.
"""

# no `from __future__ import annotations`: the field types are read at run time (typing.get_type_hints
# would need the aliases below anyway), and `Literal[SOME_TUPLE]` must be evaluated as written

import dataclasses
import functools
import typing
from collections.abc import Mapping
from typing import Any, Literal, get_args

import ml_collections

from alignx_jax import losses
from alignx_jax.config import did_you_mean
from alignx_jax.config_types import describe_type, matches_type
from alignx_jax.data import persona as persona_lib
from alignx_jax.data import prompts as prompts_lib
from alignx_jax.data.batching import OVERFLOW_POLICIES
from alignx_jax.errors import ConfigError
from alignx_jax.hardware import AUTO, COMPUTE_DTYPES, CPU_MATMULS, MATMUL_PRECISIONS
from alignx_jax.models import config as model_config
from alignx_jax.models import lora as lora_lib
from alignx_jax.models import preference_head
from alignx_jax.sharding import DEFAULT_RULES

# ----------------------------------------------------------------------------- allowed values

Method = Literal["ica", "pba", "none"]
# 'none': reference-free (TRL `reference_free=True`): no reference copy, no reference pass
ReferenceMode = Literal["on_the_fly", "precomputed", "none"]
PbaMode = Literal["joint", "two_stage"]
# 'history': the profile built from the row's sampled history (the release's PBA training profile)
PbaPreference = Literal["golden", "predicted", "mix", "history"]
NanPolicy = Literal["stop", "skip"]
SftNorm = Literal["length", "sum"]
PlanCompiler = Literal["auto", "tpu", "cpu"]

METHODS: tuple[str, ...] = get_args(Method)
REFERENCE_MODES: tuple[str, ...] = get_args(ReferenceMode)
PBA_MODES: tuple[str, ...] = get_args(PbaMode)
PBA_PREFERENCES: tuple[str, ...] = get_args(PbaPreference)
NAN_POLICIES: tuple[str, ...] = get_args(NanPolicy)
SFT_NORMS: tuple[str, ...] = get_args(SftNorm)

# owned elsewhere: the owning module's tuple as a Literal
LossType = Literal[losses.PREFERENCE_LOSS_TYPES]  # type: ignore[valid-type]
RematPolicy = Literal[model_config.REMAT_POLICIES]  # type: ignore[valid-type]
AttentionImpl = Literal[model_config.ATTENTION_IMPLS]  # type: ignore[valid-type]
CpuMatmul = Literal[CPU_MATMULS]  # type: ignore[valid-type]
MatmulPrecision = Literal[MATMUL_PRECISIONS]  # type: ignore[valid-type]
ComputeDtype = Literal[(*COMPUTE_DTYPES, AUTO)]  # type: ignore[valid-type]
ParamDtype = Literal[COMPUTE_DTYPES]  # type: ignore[valid-type]
PersonaVariant = Literal[persona_lib.PERSONA_VARIANTS]  # type: ignore[valid-type]
PromptFormat = Literal[prompts_lib.PROMPT_FORMATS]  # type: ignore[valid-type]
Overflow = Literal[OVERFLOW_POLICIES]  # type: ignore[valid-type]
History = Literal[persona_lib.HISTORY_MODES]  # type: ignore[valid-type]
Pooling = Literal[preference_head.POOLINGS]  # type: ignore[valid-type]
# logical axis name -> a mesh axis, several, or None (replicated); sharding.DEFAULT_RULES
ShardingRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


# ----------------------------------------------------------------------------- the sections


@dataclasses.dataclass
class InitSection:
    """model.init: sizes for random init (HF config.json names)."""

    enabled: bool = False  # random init allowed when hf_path is '' (tiny configs only)
    model_type: str = "llama"
    vocab_size: int = -1  # -1 -> the tokenizer's size
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    seed: int = 0  # random init; also the new adapters of a model.lora run on loaded weights


@dataclasses.dataclass
class LoraSection:
    """model.lora (models.lora): train low-rank adapters A [in, r], B [r, out] on the targeted projections
    only, base weights frozen (in param_dtype: bfloat16 keeps a QLoRA-style bf16 base); DPO's reference is
    the same model with the adapters off."""

    rank: int = 0  # 0 = full fine-tuning
    alpha: float = 0.0  # 0 = 2 * rank (scale alpha / rank)
    targets: tuple[str, ...] | str = lora_lib.LORA_TARGETS  # projections given adapters


@dataclasses.dataclass
class ModelSection:
    """model: an HF folder (or `alignx import` checkpoint) or, when hf_path is '', random init."""

    # an HF folder, hub id, .gguf file, `alignx import` checkpoint or preset; '' = random init
    hf_path: str = ""
    # the architecture `alignx plan` compiles when hf_path is '' (a preset: llama3-8b, qwen2.5-7b, smollm2):
    # a config can be planned before any weights exist; training still needs hf_path. `smollm2` is also a
    # real model: hf_path='smollm2' trains SmolLM2-135M-Instruct, prepared once by `make real-model`
    preset: str = ""
    tokenizer: str = ""  # '' -> the hf_path's tokenizer, or the shipped tiny one for random init
    init: InitSection = dataclasses.field(default_factory=InitSection)  # sizes for random init
    # compute dtype; auto: bfloat16 on GPU/TPU, CPUs with AMX, AMD CPUs with AVX-512-BF16, else float32 (alignx_jax.hardware)
    dtype: ComputeDtype = "bfloat16"
    param_dtype: ParamDtype = "float32"  # master weights
    remat: RematPolicy = "full"  # per-layer gradient checkpointing
    scan_layers: bool = True  # one compiled layer scanned over the stack (fast compiles)
    # train only the top blocks: the bottom `frozen_layers` blocks and the input embedding (so a tied
    # output layer too) get no gradient and no update; the backward pass stops above them (0 = all train)
    frozen_layers: int = 0
    # "xla" | "cudnn" (GPU flash attention) | "splash" (TPU Pallas flash attention) | "auto" (splash on
    # TPU, cudnn on a GPU for bf16/fp16 models, where each applies; else xla) | "chunked" (query blocks)
    attention_impl: AttentionImpl = "xla"
    # the library XLA's CPU backend calls for matrix products: "ynnpack" (XLA's default) | "onednn" | "auto"
    # (oneDNN for float32 models of hidden size >= 256 on Intel CPUs, not for generation; alignx_jax.hardware)
    cpu_matmul: CpuMatmul = "auto"
    # jax.default_matmul_precision of the run's programs: "default" | "high" | "highest" | "auto" (highest for a
    # float32 model on a GPU/TPU, whose default product rounds float32 inputs; else default; alignx_jax.hardware)
    matmul_precision: MatmulPrecision = "auto"
    lora: LoraSection = dataclasses.field(default_factory=LoraSection)  # LoRA adapters (rank 0 = off)


@dataclasses.dataclass
class DataSection:
    """data: the training (and held-out) rows and how they become batches."""

    train: str = ""  # parquet/JSONL/JSON file or folder, or TFDS dir; '' -> synthesize into W/data
    eval: str = ""  # held-out rows (data.train's row format) scored every train.eval_every steps ('' = none)
    method: Method = "ica"
    persona: PersonaVariant = "p"
    # 'chat' (tokenizer's template) | 'paper' (the release's evaluation strings, BOS first) | 'release' (the
    # release's training input byte for byte: no BOS, ICA without `**Post:**`/demographics, " " + EOS responses)
    prompt_format: PromptFormat = "chat"
    max_length: int = 8192  # tokens of prompt + response per row
    buckets: tuple[int, ...] = (1024, 2048, 4096, 8192)  # row lengths batches are padded to
    # one row per pair (prompt, chosen, rejected; batching.share_prompt) instead of two rows that
    # repeat the prompt: the same log-probs, the prompt's compute once. Rows are then up to
    # 2 * max_length - 1 tokens (batching.shared_row_bound), so `buckets` must reach that.
    share_prompt: bool = False
    # pack several share_prompt pairs into rows of `pack_length` tokens (0 = the largest bucket),
    # attention kept within each pair by segment ids: less padding when lengths vary
    packing: bool = False
    pack_length: int = 0  # packed row length (0 = the largest bucket)
    # run the token-wise layers (norms, projections, MLP) on each batch's real tokens only, grouped
    # per batch shard; only attention sees the padded rows (models.compaction). The same numbers.
    # The value is the kept-token sizes per row length (kept count rounded up to 1/8 of the
    # positions: at most 8 compiled step shapes per bucket, <= 1/8 padding computed); 0 = off.
    compact_tokens: int = 8
    overflow: Overflow = "drop"  # a pair over max_length: skip it, or 'truncate' it to fit (batching._fit)
    skip_bad_rows: bool = False  # drop (and count) malformed rows instead of stopping
    shuffle: bool = True  # shuffle rows every epoch (seeded by train.seed)
    # > 0: batches of rows of similar token length, from groups of this many batches (less padding;
    # each row is tokenized once more per epoch to measure it); 0 = off
    length_groups: int = 0
    # rows 2k and 2k+1 are twins (`alignx data contrast --twins`): shuffled, sharded and length-grouped
    # as one unit, so with an even batch per host both are in one batch
    twins: bool = False
    # what a training prompt shows of the persona's history (ICA, and PBA's 'history' profile): 'sample'
    # (the release: a fresh draw of up to 4 items per row and epoch), 'fixed' (one draw per row for all
    # epochs, so `loss.reference=precomputed` reuses later epochs), 'all' (the whole history, as eval)
    history: History = "sample"
    synth_users: int = (
        0  # > 0: synthesize this many users into W/data when `train` is ''; 0: train is required
    )
    synth_pairs_per_user: int = 4  # synthetic pairs per synthetic user
    synth_seed: int = 0  # seed of the synthetic users


@dataclasses.dataclass
class LossSection:
    """loss (release: sigmoid DPO, beta 0.1, no smoothing, no SFT)."""

    # losses.PREFERENCE_LOSSES: 'ipo' averages log-probs over length (as TRL), 'ipo_sum' sums them (as
    # OpenRLHF); orpo and simpo are reference-free: they never run a reference pass nor keep a reference
    # copy, whatever loss.reference says
    type: LossType = "sigmoid"
    # used as given for every type: SimPO's authors use beta 2.0 (with gamma_beta_ratio 0.25, gamma 0.5),
    # so set loss.beta=2.0 with loss.type=simpo (TRL's CPOConfig also keeps 0.1 unless told)
    beta: float = 0.1
    gamma_beta_ratio: float = 0.25  # SimPO's target margin gamma = gamma_beta_ratio * beta
    label_smoothing: float = 0.0  # cDPO/robust: the assumed fraction of flipped labels
    sft_weight: float = 0.0  # weight of the chosen response's NLL added to the loss (0 = none)
    sft_norm: SftNorm = "length"  # 'length' (mean NLL per chosen token) | 'sum'
    # 'on_the_fly' (frozen copy; with model.frozen_layers it runs on the policy's pass of the frozen blocks)
    # | 'precomputed' (one pass, stored by the data) | 'none' (reference-free: reference log-probs taken
    # as 0, TRL's reference_free=True; no copy, no pass)
    reference: ReferenceMode = "on_the_fly"
    logps_chunk: int = 512  # time chunk for sequence_logps (peak [B, chunk, V] f32 logits)
    # output logits only on a window covering each row's response (prompt positions need none):
    # the same numbers, a fraction of the output layer's cost when prompts are long
    logits_on_responses: bool = True
    # a step whose loss, gradient norm or updated params are NaN/inf: 'stop' the run there (nothing of it is
    # saved) | 'skip' its update (counted as skipped_nonfinite_steps); max_skipped_steps in a row stop the run
    nan_policy: NanPolicy = "stop"
    max_skipped_steps: int = 10  # non-finite steps in a row that stop the run under nan_policy skip


@dataclasses.dataclass
class OptimSection:
    """optim: AdamW + clip, linear warm-up then cosine to min_lr_ratio * lr."""

    lr: float = 5e-7  # peak learning rate
    warmup_ratio: float = 0.1  # fraction of the steps spent warming up linearly from 0
    min_lr_ratio: float = 0.1  # the cosine ends at min_lr_ratio * lr
    b1: float = 0.9  # AdamW first-moment decay
    b2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.0  # decoupled (AdamW) weight decay
    clip: float = 1.0  # global gradient-norm clip


@dataclasses.dataclass
class TrainSection:
    """train: the loop."""

    steps: int = -1  # -1 -> as many steps as `epochs` passes over the data take
    epochs: int = 1  # passes over the data when steps is -1
    global_batch: int = 128  # pairs per optimizer step
    micro_batch: int = 0  # pairs per forward pass (grad accumulation); 0 -> global_batch
    seed: int = 42  # data order and sampling
    log_every: int = 1  # steps between metrics.jsonl records
    # every N steps (and at the last) score data.eval's rows at the current params: `eval/...` records
    # in metrics.jsonl (TRL's eval_steps); 0 = off
    eval_every: int = 0
    distributed: bool = False  # jax.distributed.initialize() (multi-host; set by launch/tpu_pod.sh)
    progress: bool = True  # tqdm bar on process 0
    # W&B project the train metrics also go to ('' = off); needs `pip install wandb`; WANDB_MODE=offline
    # and the other WANDB_* variables are honoured as wandb reads them
    wandb_project: str = ""
    # a resume may change only how long/where/how fast the run goes (train.steps, checkpoint.*, mesh.*, ...;
    # workdir.FREE_KEYS); true also accepts changed model/data/loss/optim keys, with a warning listing them
    # (not data.synth_*: W/data is what the checkpoints trained on)
    allow_config_change: bool = False


@dataclasses.dataclass
class MeshSection:
    """mesh: device mesh sizes (-1 = the remaining devices)."""

    data: int = 1  # data-parallel replicas
    fsdp: int = -1  # fully sharded data parallel: parameters sharded over the model dimension
    tensor: int = 1  # tensor parallel: the wide dimensions (heads, mlp, vocab) sharded


@dataclasses.dataclass
class ShardingSection:
    """sharding: logical -> mesh axis rules."""

    rules: ShardingRules = DEFAULT_RULES  # first match wins, as in flax's logical rules


@dataclasses.dataclass
class CheckpointSection:
    """checkpoint: orbax checkpoints under W/checkpoints."""

    every_steps: int = 250  # save every N steps (and at the last step and on a stop signal)
    keep: int = 3  # checkpoints kept (the newest)
    # the key is "async", a Python keyword: set/read it by item (cfg.checkpoint["async"])
    async_: bool = dataclasses.field(default=True, metadata={"key": "async"})


@dataclasses.dataclass
class PBASection:
    """pba: the PBA preference-vector head (configured here, used when data.method == 'pba')."""

    enabled: bool = False  # train the head (with data.method pba)
    weight: float = 1.0  # weight of the head's loss added to DPO
    stop_gradient: bool = True  # head reads detached persona features (policy is not pulled by it)
    pooling: Pooling = "mean"  # over persona tokens
    hidden: int = 256  # the head's hidden width
    class_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # for the {0, 0.5, 1} classes
    mode: PbaMode = "joint"  # 'joint' (trained in the DPO step) | 'two_stage' (fit on the final policy)
    # P~ in the policy's prompt: 'golden' (the row's own pair-level direction, else its `profile`) |
    # 'history' (the release: its P~ rule on the row's sampled history) | 'predicted' | 'mix' (see train/loop.py)
    preference: PbaPreference = "golden"
    mix_predicted: float = (
        0.5  # 'mix': the fraction of rows (fixed per row) whose profile is the predicted P~
    )
    focal_gamma: float = 0.0  # > 0: focal CE (1 - p_true)^gamma, against the mostly-neutral labels
    max_persona_tokens: int = 1024  # head input: BOS + the last (n - 1) persona tokens; <= max(data.buckets)
    lr: float = 3e-3  # the head's own AdamW (constant lr): the policy's DPO lr (5e-7) would not move it
    weight_decay: float = 1e-4  # the head's AdamW weight decay
    seed: int = 0  # head init
    # two-stage head (mode 'two_stage', at the end of the run) and the first-stage head that predicts
    # the profiles for preference 'predicted' / 'mix' (on the initial policy, before step 1)
    head_steps: int = 500  # AdamW steps on cached pooled features
    head_batch_size: int = 64  # rows per head step
    head_rows: int = 0  # training rows the head is fit on (a seeded subset); 0 -> all


@dataclasses.dataclass
class PlanSection:
    """plan: `alignx plan`'s target."""

    topology: str = ""  # the topology the config is meant for ('' = this machine's devices; --topology wins)
    # 'auto': a TPU topology is compiled by the TPU compiler itself where libtpu is installed (no TPU needed:
    # pip install 'alignx-jax[tpu-plan]'), else by the CPU compiler on stand-in devices (the report says
    # which); 'tpu' | 'cpu' insist on one (--compiler wins)
    compiler: PlanCompiler = "auto"


@dataclasses.dataclass
class RunConfig:
    """A whole run config: the release's DPO hyper-parameters (docs/method.md section 6) by default; its
    exact training input is `configs/base.py`'s `release_recipe` (section 6b)."""

    workdir: str = ""  # required: W/ holds config.json, metrics.jsonl, reference/, checkpoints/
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    loss: LossSection = dataclasses.field(default_factory=LossSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    sharding: ShardingSection = dataclasses.field(default_factory=ShardingSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    pba: PBASection = dataclasses.field(default_factory=PBASection)
    plan: PlanSection = dataclasses.field(default_factory=PlanSection)


# ----------------------------------------------------------------------------- defaults and saved configs


def config_key(f: dataclasses.Field) -> str:
    """The config key of a section field (its name, unless metadata says otherwise: `async`)."""
    return f.metadata.get("key", f.name)


@functools.cache
def section_fields(cls: type) -> tuple[tuple[str, Any], ...]:
    """(config key, resolved type) of each field of a section dataclass, in order."""
    hints = typing.get_type_hints(cls)
    return tuple((config_key(f), hints[f.name]) for f in dataclasses.fields(cls))


def _as_dict(section: Any) -> dict[str, Any]:
    return {
        config_key(f): _as_dict(v) if dataclasses.is_dataclass(v) else v
        for f in dataclasses.fields(section)
        for v in [getattr(section, f.name)]
    }


def default_config() -> ml_collections.ConfigDict:
    """Every key a run can set, at its default: the ConfigDict every config file starts from."""
    return ml_collections.ConfigDict(_as_dict(RunConfig()))


def _tuples(value: Any) -> Any:
    # JSON has no tuples: a saved list is the tuple the config held
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def merge_saved(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A config saved by any version (W/config.json as a dict) laid over today's defaults: keys added
    since take their defaults, keys since removed are dropped. A saved value of the wrong type is a
    ConfigError naming its key."""
    cfg = default_config()
    _lay(cfg, saved, RunConfig, "")
    return cfg


def _lay(node: ml_collections.ConfigDict, saved: Mapping[str, Any], cls: type, prefix: str) -> None:
    for key, tp in section_fields(cls):
        if key not in saved:
            continue
        value, name = saved[key], prefix + key
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(f"saved config: {name} is {value!r}, not a section")
            _lay(node[key], value, tp, name + ".")
            continue
        value = _tuples(value)
        if not matches_type(value, tp):
            raise ConfigError(f"saved config: {name}={value!r}: expected {describe_type(tp)}")
        with node.ignore_type():
            node[key] = value


# ----------------------------------------------------------------------------- types


def check_types(cfg: ml_collections.ConfigDict) -> None:
    """Every schema key present, no other key, each value of its field's type and each Literal field one
    of its values; the first failure is one ConfigError line naming the key."""
    _check_section(cfg, RunConfig, "", cfg)


def check_keys_present(cfg: ml_collections.ConfigDict) -> None:
    """Every schema key present (a section that is no section is left to `check_types`): what a config
    file's get_config() returned, before overrides, which can add no key (`config.load_config`'s `check`)."""
    _check_present(cfg, RunConfig, "")


def _check_present(node: Any, cls: type, prefix: str) -> None:
    if not isinstance(node, (ml_collections.ConfigDict, Mapping)):
        return
    for key, tp in section_fields(cls):
        if key not in node:
            raise _missing(prefix + key)
        if dataclasses.is_dataclass(tp):
            _check_present(node[key], tp, prefix + key + ".")


def _missing(name: str) -> ConfigError:
    return ConfigError(
        f"config key {name} is missing: build configs from configs/base.py's get_config() "
        "(config_schema.default_config()), a saved one with config_schema.merge_saved()"
    )


def _check_section(node: Any, cls: type, prefix: str, root: ml_collections.ConfigDict) -> None:
    if not isinstance(node, (ml_collections.ConfigDict, Mapping)):
        raise ConfigError(f"{prefix.rstrip('.')}={node!r}: expected a section ({cls.__name__})")
    known = section_fields(cls)
    for key, tp in known:
        name = prefix + key
        if key not in node:
            raise _missing(name)
        value = node[key]
        if dataclasses.is_dataclass(tp):
            _check_section(value, tp, name + ".", root)
        elif not matches_type(value, tp):
            raise ConfigError(f"{name}={value!r}: expected {describe_type(tp)}")
    extra = sorted(set(node.keys()) - {k for k, _ in known})
    if extra:
        name = prefix + extra[0]
        near = did_you_mean(root, name) if isinstance(root, ml_collections.ConfigDict) else ""
        raise ConfigError(f"unknown config key {name!r} (not in alignx_jax.config_schema){near}")


# ----------------------------------------------------------------------------- questions asked of a config


def head_enabled(cfg: ml_collections.ConfigDict) -> bool:
    """Whether the run trains PBA's preference head (either mode)."""
    return cfg.data.method == "pba" and bool(cfg.pba.enabled)


def joint_head(cfg: ml_collections.ConfigDict) -> bool:
    """Whether the head is trained inside the DPO step (persona ids then travel with every batch)."""
    return head_enabled(cfg) and cfg.pba.mode == "joint"


def two_stage_head(cfg: ml_collections.ConfigDict) -> bool:
    """Whether the head is fit on the final policy after the last DPO step."""
    return head_enabled(cfg) and cfg.pba.mode == "two_stage"


def uses_predicted(cfg: ml_collections.ConfigDict) -> bool:
    """Whether the policy's prompts render a first-stage head's predicted P~ (for some rows)."""
    if cfg.pba.preference == "mix" and cfg.pba.mix_predicted == 0:  # no row: no first-stage head to fit
        return False
    return cfg.data.method == "pba" and cfg.pba.preference not in ("golden", "history")


# ----------------------------------------------------------------------------- validation
