"""Column contracts: the published Pick-a-Pic v2 layout and our normalised pair schema."""

from __future__ import annotations

import pyarrow as pa

# METHOD.md §1: the columns of the published Parquet / `datasets` form of Pick-a-Pic v2.
PICKAPIC_SCHEMA = pa.schema(
    [
        ("are_different", pa.bool_()),
        ("best_image_uid", pa.string()),
        ("caption", pa.string()),
        ("created_at", pa.timestamp("ns")),
        ("has_label", pa.bool_()),
        ("image_0_uid", pa.string()),
        ("image_0_url", pa.string()),
        ("image_1_uid", pa.string()),
        ("image_1_url", pa.string()),
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),
        ("label_1", pa.float64()),
        ("model_0", pa.string()),
        ("model_1", pa.string()),
        ("ranking_id", pa.int64()),
        ("user_id", pa.int64()),
        ("num_example_per_prompt", pa.int64()),
    ]
)

# What the download stage writes: one row per usable pair, ties and unusable rows removed.
PAIRS_SCHEMA = pa.schema(
    [
        ("pair_id", pa.int64()),  # the source's ranking_id
        ("caption", pa.string()),
        ("image_0_uid", pa.string()),
        ("image_1_uid", pa.string()),
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),  # 1.0: image 0 is the human winner, 0.0: image 1 is
        ("model_0", pa.string()),
        ("model_1", pa.string()),
        ("user_id", pa.int64()),
    ]
)
