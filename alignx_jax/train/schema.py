"""The trainer's config rules, as the trainer's modules import them: the allowed values,
`validate_config`, and the questions the other modules ask of a config (`head_enabled`, `joint_head`,
`two_stage_head`, `uses_predicted`).

They are defined once, with every key's type and default, in `alignx_jax.config_schema`; this module
re-exports them, so `alignx train`, `alignx plan` and the demos refuse the same configs with the same
one-line `ConfigError`.
"""

from __future__ import annotations

from alignx_jax.config_schema import (
    METHODS,
    NAN_POLICIES,
    PBA_MODES,
    PBA_PREFERENCES,
    REFERENCE_MODES,
    check_types,
    default_config,
    head_enabled,
    joint_head,
    merge_saved,
    two_stage_head,
    uses_predicted,
    validate_config,
)

__all__ = [
    "METHODS",
    "NAN_POLICIES",
    "PBA_MODES",
    "PBA_PREFERENCES",
    "REFERENCE_MODES",
    "check_types",
    "default_config",
    "head_enabled",
    "joint_head",
    "merge_saved",
    "two_stage_head",
    "uses_predicted",
    "validate_config",
]
