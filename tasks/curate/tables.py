"""The two tables of the front of the loop, shared by their writers (tasks/expand.py,
tasks/candidates.py) and their reader (the curation page).

data/manifest/expand.parquet      one row per word x variation x template: the image prompt
data/manifest/candidates.parquet  one row per prompt x seed: the rendered candidate
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from tasks.core.manifest import MANIFEST_DIR

EXPAND_TABLE = MANIFEST_DIR / "expand.parquet"
CANDIDATES_TABLE = MANIFEST_DIR / "candidates.parquet"
CANDIDATES_STORE = Path("data/derived/candidates")

EXPAND = pa.schema([
    pa.field("id", pa.string(), nullable=False),  # sha256 of (word, variation, template name)[:16]; stable
    pa.field("word", pa.string(), nullable=False),  # the line of the words file, stripped
    pa.field("variation", pa.int32(), nullable=False),  # 0 .. expand.variations - 1
    pa.field("template", pa.string(), nullable=False),  # the image template's name (hit rate per template)
    pa.field("scene", pa.string()),  # the instruction model's answer, normalised; null on failure
    pa.field("prompt", pa.string()),  # template.format(scene=scene); null on failure
    pa.field("key", pa.string()),  # the store item (the model's raw answer); null on failure
    pa.field("file", pa.string()),  # relative to the expand store
    pa.field("error", pa.string()),  # why it failed; null when it did not
])

CANDIDATES = pa.schema([
    pa.field("id", pa.string(), nullable=False),  # the render key: prompt, seed, checkpoint id, sampler settings
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("word", pa.string()),  # from the expand row (the first one, when prompts repeat)
    pa.field("template", pa.string()),
    pa.field("generator", pa.string(), nullable=False),  # sdxl | lora | nanodit
    pa.field("checkpoint", pa.string(), nullable=False),  # the model id or checkpoint folder used
    pa.field("checkpoint_id", pa.string(), nullable=False),  # content hash of its weights (in the key)
    pa.field("key", pa.string()),  # null when the render failed
    pa.field("file", pa.string()),  # PNG, relative to CANDIDATES_STORE
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("error", pa.string()),
])
