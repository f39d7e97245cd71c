"""DeepSpeed config generation: memory model, ZeRO stage/offload/batch selection, presets.

The engine calls :func:`make_ds_config` with a :class:`BatchPlan` from :func:`resolve_batch`; batch arithmetic
lives only in :mod:`ds_configs.batch`.
"""

from ds_configs.batch import BatchPlan, resolve_batch
from ds_configs.build import (
    load_user_config,
    make_ds_config,
    resolve_precision,
    validate_ds_config,
    zero_settings_from_json,
)

__all__ = [
    "BatchPlan",
    "load_user_config",
    "make_ds_config",
    "resolve_batch",
    "resolve_precision",
    "validate_ds_config",
    "zero_settings_from_json",
]
