"""Shared defaults for every run config: the release's DPO recipe (docs/method.md section 6).

Other config files call `get_config()` from here (via `runpy`, since configs are loaded by path)
and change only what differs. Every key a run can set exists here, so a misspelt override is a
ConfigError rather than a silently ignored value.
"""

from __future__ import annotations

import ml_collections

from alignx_jax.sharding import DEFAULT_RULES


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.workdir = ""  # required: W/ holds config.json, metrics.jsonl, reference/, checkpoints/

    # --- model: an HF folder (or `alignx import` checkpoint) or, when hf_path is '', random init
    c.model = ml_collections.ConfigDict()
    c.model.hf_path = ""
    # the architecture `alignx plan` compiles when hf_path is '' (a preset: llama3-8b, qwen2.5-7b, smollm2):
    # a config can be planned before any weights exist; training still needs hf_path. `smollm2` is also a
    # real model: hf_path='smollm2' trains SmolLM2-135M-Instruct, prepared once by `make real-model`
    c.model.preset = ""
    c.model.tokenizer = ""  # '' -> the hf_path's tokenizer, or the shipped tiny one for random init
    c.model.init = ml_collections.ConfigDict()  # sizes for random init (HF config.json names)
    c.model.init.enabled = False  # random init allowed when hf_path is '' (tiny configs only)
    c.model.init.model_type = "llama"
    c.model.init.vocab_size = -1  # -1 -> the tokenizer's size
    c.model.init.hidden_size = 64
    c.model.init.intermediate_size = 128
    c.model.init.num_hidden_layers = 2
    c.model.init.num_attention_heads = 4
    c.model.init.num_key_value_heads = 2
    c.model.init.head_dim = 16
    c.model.init.rope_theta = 10000.0
    c.model.init.rms_norm_eps = 1e-5
    c.model.init.max_position_embeddings = 8192
    c.model.init.tie_word_embeddings = False
    c.model.init.seed = 0
    c.model.dtype = "bfloat16"  # compute dtype
    c.model.param_dtype = "float32"  # master weights
    c.model.remat = "full"  # per-layer gradient checkpointing: "none" | "full" | "dots" | "dots_no_batch"
    c.model.scan_layers = True
    # train only the top blocks: the bottom `frozen_layers` blocks and the input embedding (so a tied
    # output layer too) get no gradient and no update; the backward pass stops above them (0 = all train)
    c.model.frozen_layers = 0
    # "xla" | "cudnn" (GPU flash attention) | "splash" (TPU Pallas flash attention) | "auto" (splash on
    # TPU, else jax.nn.dot_product_attention's pick) | "chunked" (query blocks)
    c.model.attention_impl = "xla"
    # LoRA (models.lora): train low-rank adapters A [in, r], B [r, out] on the targeted projections only,
    # base weights frozen (in param_dtype: bfloat16 keeps a QLoRA-style bf16 base); DPO's reference is the
    # same model with the adapters off. rank 0 = full fine-tuning; alpha 0 = 2 * rank (scale alpha / rank)
    c.model.lora = ml_collections.ConfigDict()
    c.model.lora.rank = 0
    c.model.lora.alpha = 0.0
    c.model.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    # --- data
    c.data = ml_collections.ConfigDict()
    c.data.train = ""  # parquet/JSONL/JSON file or folder, or TFDS dir; '' -> synthesize into W/data
    # held-out rows (data.train's row format) scored every train.eval_every steps ('' = none)
    c.data.eval = ""
    c.data.method = "ica"  # 'ica' | 'pba' | 'none'
    c.data.persona = "p"  # 'ugc' | 'pair' | 'demo' | 'p'
    # 'chat' (tokenizer's template) | 'paper' (the release's evaluation strings, BOS first) | 'release' (the
    # release's training input byte for byte: no BOS, ICA without `**Post:**`/demographics, " " + EOS responses)
    c.data.prompt_format = "chat"
    c.data.max_length = 8192
    c.data.buckets = (1024, 2048, 4096, 8192)
    # one row per pair (prompt, chosen, rejected; batching.share_prompt) instead of two rows that
    # repeat the prompt: the same log-probs, the prompt's compute once. Rows are then up to
    # max_length + the longer response long, so `buckets` must reach that.
    c.data.share_prompt = False
    # pack several share_prompt pairs into rows of `pack_length` tokens (0 = the largest bucket),
    # attention kept within each pair by segment ids: less padding when lengths vary
    c.data.packing = False
    c.data.pack_length = 0
    # run the token-wise layers (norms, projections, MLP) on each batch's real tokens only, grouped
    # per batch shard; only attention sees the padded rows (models.compaction). The same numbers.
    # The value is the kept-token sizes per row length (kept count rounded up to 1/8 of the
    # positions: at most 8 compiled step shapes per bucket, <= 1/8 padding computed); 0 = off.
    c.data.compact_tokens = 8
    c.data.overflow = "drop"  # release: longer prompts dropped; 'truncate' left-truncates the prompt
    c.data.skip_bad_rows = False
    c.data.shuffle = True
    c.data.synth_users = (
        0  # > 0: synthesize this many users into W/data when `train` is ''; 0: train is required
    )
    c.data.synth_pairs_per_user = 4
    c.data.synth_seed = 0

    # --- loss (release: sigmoid DPO, beta 0.1, no smoothing, no SFT)
    c.loss = ml_collections.ConfigDict()
    # 'sigmoid' | 'cdpo' | 'robust' | 'hinge' | 'ipo' (length-averaged log-probs, as TRL) | 'ipo_sum'
    # (summed, as OpenRLHF) | 'orpo' | 'simpo' (losses.PREFERENCE_LOSSES; orpo and simpo are reference-free:
    # they never run a reference pass nor keep a reference copy, whatever loss.reference says)
    c.loss.type = "sigmoid"
    # used as given for every type: SimPO's authors use beta 2.0 (with gamma_beta_ratio 0.25, gamma 0.5),
    # so set loss.beta=2.0 with loss.type=simpo (TRL's CPOConfig also keeps 0.1 unless told)
    c.loss.beta = 0.1
    c.loss.gamma_beta_ratio = 0.25  # SimPO's target margin gamma = gamma_beta_ratio * beta
    c.loss.label_smoothing = 0.0
    c.loss.sft_weight = 0.0
    c.loss.sft_norm = "length"  # 'length' (mean NLL per chosen token) | 'sum'
    # 'on_the_fly' (frozen copy) | 'precomputed' (one pass, stored by the data) | 'none' (reference-free:
    # reference log-probs taken as 0, TRL's reference_free=True; no copy, no pass)
    c.loss.reference = "on_the_fly"
    c.loss.logps_chunk = 512  # time chunk for sequence_logps (peak [B, chunk, V] f32 logits)
    # output logits only on a window covering each row's response (prompt positions need none):
    # the same numbers, a fraction of the output layer's cost when prompts are long
    c.loss.logits_on_responses = True
    # a step whose loss, gradient norm or updated params are NaN/inf: 'stop' the run there (nothing of it is
    # saved) | 'skip' its update (counted as skipped_nonfinite_steps); max_skipped_steps in a row stop the run
    c.loss.nan_policy = "stop"
    c.loss.max_skipped_steps = 10

    # --- optimizer: AdamW + clip, linear warm-up then cosine to min_lr_ratio * lr
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 5e-7
    c.optim.warmup_ratio = 0.1
    c.optim.min_lr_ratio = 0.1
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.clip = 1.0

    # --- train loop
    c.train = ml_collections.ConfigDict()
    c.train.steps = -1  # -1 -> as many steps as `epochs` passes over the data take
    c.train.epochs = 1
    c.train.global_batch = 128  # pairs per optimizer step
    c.train.micro_batch = 0  # pairs per forward pass (grad accumulation); 0 -> global_batch
    c.train.seed = 42
    c.train.log_every = 1
    # every N steps (and at the last) score data.eval's rows at the current params: `eval/...` records
    # in metrics.jsonl (TRL's eval_steps); 0 = off
    c.train.eval_every = 0
    c.train.distributed = False  # jax.distributed.initialize() (multi-host; set by launch/tpu_pod.sh)
    c.train.progress = True  # tqdm bar on process 0
    # W&B project the train metrics also go to ('' = off); needs `pip install wandb`; WANDB_MODE=offline
    # and the other WANDB_* variables are honoured as wandb reads them
    c.train.wandb_project = ""
    # a resume may change only how long/where/how fast the run goes (train.steps, checkpoint.*, mesh.*, ...;
    # workdir.FREE_KEYS); true also accepts changed model/data/loss/optim keys, with a warning listing them
    c.train.allow_config_change = False

    # --- mesh (-1 = the remaining devices) and logical -> mesh axis rules
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.sharding = ml_collections.ConfigDict()
    c.sharding.rules = DEFAULT_RULES

    # --- orbax checkpoints under W/checkpoints
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 250
    c.checkpoint.keep = 3
    c.checkpoint["async"] = True  # ("async" is a Python keyword: set/read it by item)

    # --- PBA preference-vector head (configured here, used when data.method == 'pba')
    c.pba = ml_collections.ConfigDict()
    c.pba.enabled = False
    c.pba.weight = 1.0  # weight of the head's loss added to DPO
    c.pba.stop_gradient = True  # head reads detached persona features (policy is not pulled by it)
    c.pba.pooling = "mean"  # 'mean' | 'last' over persona tokens
    c.pba.hidden = 256
    c.pba.class_weights = (1.0, 1.0, 1.0)  # for the {0, 0.5, 1} classes
    c.pba.mode = "joint"  # 'joint' | 'two_stage'
    # P~ in the policy's prompt: 'golden' (the row's own pair-level direction: the golden-direction variant) |
    # 'history' (the release: its P~ rule on the row's sampled history) | 'predicted' | 'mix' (see train.py)
    c.pba.preference = "golden"
    c.pba.mix_predicted = 0.5  # 'mix': the fraction of rows (fixed per row) whose profile is the predicted P~
    c.pba.focal_gamma = 0.0  # > 0: focal CE (1 - p_true)^gamma, against the mostly-neutral labels
    c.pba.max_persona_tokens = 1024  # head input: BOS + the last (n - 1) persona tokens; <= max(data.buckets)
    c.pba.lr = 3e-3  # the head's own AdamW (constant lr): the policy's DPO lr (5e-7) would not move it
    c.pba.weight_decay = 1e-4
    c.pba.seed = 0  # head init
    # two-stage head (mode 'two_stage', at the end of the run) and the first-stage head that predicts
    # the profiles for preference 'predicted' / 'mix' (on the initial policy, before step 1)
    c.pba.head_steps = 500  # AdamW steps on cached pooled features
    c.pba.head_batch_size = 64
    c.pba.head_rows = 0  # training rows the head is fit on (a seeded subset); 0 -> all

    # --- alignx plan: the topology the config is meant for ('' = this machine's devices; --topology wins)
    c.plan = ml_collections.ConfigDict()
    c.plan.topology = ""
    return c


def release_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The release's full-scale recipe (docs/method.md section 6) for a real 7-8B model, in place.

    The model and data paths stay '' so that a run without `--config.model.hf_path` and
    `--config.data.train` fails with a clear ConfigError instead of training something else.
    """
    c.model.hf_path = ""
    c.model.dtype, c.model.param_dtype = "bfloat16", "float32"  # bf16 compute, fp32 master weights
    c.model.remat = "full"  # gradient checkpointing
    c.model.scan_layers = True  # one compiled layer: an 8B model compiles in reasonable time
    c.data.train = ""
    c.data.persona = "p"
    c.data.prompt_format = "release"  # the release's training input (docs/method.md section 6b)
    c.data.max_length = 8192
    c.data.buckets = (1024, 2048, 4096, 8192)
    c.data.overflow = "drop"  # the release drops a pair whose prompt alone reaches max_length - 2
    c.pba.preference = "history"  # PBA's profile: the release's P~ of the sampled history (used when pba)
    c.loss.type, c.loss.beta, c.loss.reference = "sigmoid", 0.1, "on_the_fly"
    c.loss.logps_chunk = 1024
    c.optim.lr = 5e-7
    c.optim.warmup_ratio, c.optim.min_lr_ratio = 0.1, 0.1
    c.optim.b1, c.optim.b2 = 0.9, 0.95
    c.optim.weight_decay, c.optim.clip = 0.0, 1.0
    c.train.steps, c.train.epochs = -1, 1
    c.train.global_batch = 128
    c.train.seed = 42
    c.checkpoint.every_steps, c.checkpoint.keep = 200, 3
    return c
