"""The Parquet schemas of the outputs, declared once."""
from __future__ import annotations

import pyarrow as pa

TOP5 = pa.list_(pa.struct([("label", pa.int32()), ("prob", pa.float32())]))
QUALITY_LEVELS = pa.list_(pa.struct([("quality", pa.int32()), ("blocks", pa.int32())]))

#: One row per (input, attack, defense) variant.
METADATA_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("label", pa.int32()),
        ("attack", pa.string()),
        ("attack_spec", pa.string()),
        ("input_attack", pa.string()),
        ("defense", pa.string()),
        ("defense_spec", pa.string()),
        ("pred", pa.int32()),
        ("pred_name", pa.string()),
        ("prob", pa.float32()),
        ("top5", TOP5),
        ("correct", pa.bool_()),
        ("clean_pred", pa.int32()),
        ("agree_clean", pa.bool_()),
        ("bytes", pa.int64()),
        ("bpp", pa.float32()),
        ("psnr", pa.float32()),
        ("ssim", pa.float32()),
        ("linf", pa.float32()),
        ("l2", pa.float32()),
        ("rmse", pa.float32()),
        ("success", pa.bool_()),
        ("target", pa.int32()),
        ("iterations", pa.int32()),
        ("attack_seconds", pa.float32()),
        ("quality", pa.int32()),
        ("quality_levels", QUALITY_LEVELS),
        ("target_bytes", pa.int64()),
        ("profile_bytes", pa.int64()),
        ("map_model", pa.string()),
        ("map_seconds", pa.float32()),
        ("stability", pa.float32()),
        ("jpeg_stability", pa.float32()),
        ("flagged", pa.bool_()),
        ("noise_level", pa.float32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("model", pa.string()),
        ("run_id", pa.string()),
    ]
)

#: One row per input (or input variant) that could not be processed.
ERRORS_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("member", pa.string()),
        ("source", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("attack_spec", pa.string()),
        ("defense_spec", pa.string()),
        ("run_id", pa.string()),
    ]
)
