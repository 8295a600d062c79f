"""Alignment accuracy on the AlignX benchmarks (docs/method.md section 7) and `alignx eval`.

For each pair, r(y) = beta * (log pi(y|x) - log pi_ref(y|x)), the log-probs summed over the
response tokens plus the closing EOS; the pair is correct iff r(chosen) > r(rejected) strictly.
With no reference the policy's own log-probs are compared.

Scoring is batched: the chosen and rejected sequences of several pairs go through one forward pass
in the DPO batch layout of `data/batching.collate` (right padding, so a causal mask keeps padding
out of every real token's context and a sequence's log-prob does not depend on its neighbours).
Pairs are sorted by length and cut into batches; each batch is padded to a length bucket, so there
is one compilation per bucket shape. Batches are sharded over all devices on the `data` axis with
the training code's mesh and rules.

Choices made here (docs/method.md leaves them open):
  * the release scores one unpadded sequence per forward pass; this module pads, which changes the
    result only by float rounding (tests/test_evaluate.py checks it against transformers);
  * persona variants: `alignx` reports ugc/pair/demo/p separately (default all four); the other
    benchmarks render whichever persona fields a row has (`p`) unless --persona says otherwise.
    When the prompt does not depend on the persona (--method none, or pba with the golden P~) each
    benchmark is scored once and reported without a persona level;
  * a benchmark NAME given twice (e.g. two UF-P-4 files) is reported per file as `NAME:FILE` plus
    the pooled `NAME`; a folder of several files (a UF-P-4 folder) is reported as its key (pooled) plus
    `KEY:FILE` for each file some scored row is in (`.2`, ... where two files share a name);
  * `--flip` reports, besides the overall accuracy, the accuracy on the pairs whose P~ is
    non-neutral on at least one flipped dimension (`involved`) and on the others (`rest`);
  * PBA's P~ (`--preference`): `golden` = the row's `Preference Direction` (else its `profile`),
    `profile` = the row's `profile` text as the release's PBA evaluation uses it, `predicted` = the
    model folder's preference head;
  * `--reference-prompt`: `same` (default) scores the reference on the policy's prompt; `ica` scores
    it on the ICA prompt of the same row (whole history, persona `p` unless a persona variant is being
    scored), as the release's only reference script does, also for a PBA policy;
  * `--prompt-format` defaults to the one the model was trained with when its folder records it
    (`export.trained_prompt_format`; a `release`-trained model is evaluated with `paper`, the release's
    evaluation input), else `chat`.
"""

from __future__ import annotations

from alignx_jax.evaluate.cli import cli_eval
from alignx_jax.evaluate.options import (
    BENCHMARKS,
    PERSONA_VARIANTS,
    PREFERENCES,
    REFERENCE_PROMPTS,
    BenchmarkSpec,
    EvalSettings,
    check_cpu_matmul,
    default_prompt_format,
    flip_direction,
    involves,
    parse_benchmark_specs,
    parse_flip,
    persona_dependent,
    resolve_personas,
)
from alignx_jax.evaluate.profiles import PredictedPreferences, file_profile, golden_profile
from alignx_jax.evaluate.results import (
    KEY_FIELDS,
    LOGP_KEYS,
    MAX_PERSONA_GROUPS,
    WILSON_Z95,
    PerExampleLog,
    accuracy_stats,
    is_correct,
    key_of,
    parse_per_example,
    reward,
    reward_stats,
    summarize,
    wilson_interval,
)
from alignx_jax.evaluate.run import evaluate
from alignx_jax.evaluate.scoring import (
    SequenceScorer,
    StoredScores,
    data_parallel_size,
    length_buckets,
    score_batches,
    scorer_on,
)
from alignx_jax.export import trained_prompt_format

__all__ = [
    "BENCHMARKS",
    "BenchmarkSpec",
    "EvalSettings",
    "KEY_FIELDS",
    "LOGP_KEYS",
    "MAX_PERSONA_GROUPS",
    "PERSONA_VARIANTS",
    "PREFERENCES",
    "PerExampleLog",
    "PredictedPreferences",
    "REFERENCE_PROMPTS",
    "SequenceScorer",
    "StoredScores",
    "WILSON_Z95",
    "accuracy_stats",
    "check_cpu_matmul",
    "cli_eval",
    "data_parallel_size",
    "default_prompt_format",
    "evaluate",
    "file_profile",
    "flip_direction",
    "golden_profile",
    "involves",
    "is_correct",
    "key_of",
    "length_buckets",
    "parse_benchmark_specs",
    "parse_flip",
    "parse_per_example",
    "persona_dependent",
    "resolve_personas",
    "reward",
    "reward_stats",
    "score_batches",
    "scorer_on",
    "summarize",
    "trained_prompt_format",
    "wilson_interval",
]
