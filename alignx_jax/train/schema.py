"""A re-export of `alignx_jax.config_schema`'s rules for `train.loop`, its last importer; every other
module imports `config_schema`, the one owner of the config's keys, defaults and checks. Delete this
module once `train.loop` imports `config_schema` too.
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
