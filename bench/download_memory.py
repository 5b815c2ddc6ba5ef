"""Peak memory of the download stage: N pairs vs 10N pairs must stay within 1.3x.

    .venv/bin/python bench/download_memory.py                  # N=1000, both layouts (~2 min)
    .venv/bin/python bench/download_memory.py --pairs 400 --layouts parquet   # ~15 s

Writes Pick-a-Pic-format sources of N and 10N pairs with realistic images (256-512 px JPEGs of
noisy drawn scenes, ~0.1 MB a pair, with ties, unlabelled and corrupt rows), as a Parquet
folder in the hub layout and as a `datasets.save_to_disk` folder, then runs the download
(`download_pairs(iter_source(...))` with the stage's default shard size) in a fresh
subprocess per source, which reports its own peak RSS (VmHWM). Prints one line per run and
the ratios; exits 1 if any ratio exceeds the limit.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from smpo_core.schema import PICKAPIC_SCHEMA
from smpo_core.settings import DownloadSettings

LIMIT = 1.3
ROWS_PER_FILE = 200  # the published files hold ~1.5k rows; fewer keeps N small and realistic
ROW_GROUP_ROWS = 100  # what `datasets` writes for binary columns
POOL = 48  # distinct drawings; each row's bytes are still unique (see _unique)


def _drawing(rng: random.Random) -> bytes:
    """A noisy scene at 256-512 px: compresses like a photo, not like flat colour."""
    size = rng.choice((256, 320, 384, 448, 512))
    noise = Image.effect_noise((size, size), rng.uniform(30, 60))
    tint = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    image = Image.blend(Image.merge("RGB", (noise,) * 3), tint, 0.5)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(2, 6)):
        x, y, r = rng.randrange(size), rng.randrange(size), rng.randrange(size // 8, size // 3)
        colour = tuple(rng.randrange(256) for _ in range(3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _unique(jpeg: bytes, tag: int) -> bytes:
    """The same picture with a JPEG comment segment carrying `tag`: distinct bytes per row
    (so nothing dedups or dictionary-encodes), decoding unchanged."""
    comment = f"row {tag}".encode()
    return jpeg[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + jpeg[2:]


def write_source(folder: Path, num_pairs: int, pool: list[bytes], seed: int = 0) -> int:
    """Pick-a-Pic v2 train split in the hub layout; returns its size in bytes."""
    rng = random.Random(seed)
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    files = (num_pairs + ROWS_PER_FILE - 1) // ROWS_PER_FILE
    base = datetime(2023, 4, 1)
    for index in range(files):
        rows = []
        for row in range(index * ROWS_PER_FILE, min(num_pairs, (index + 1) * ROWS_PER_FILE)):
            a, b = rng.sample(range(len(pool)), 2)
            jpg = [_unique(pool[a], 2 * row), _unique(pool[b], 2 * row + 1)]
            label = 0.5 if row % 10 == 3 else float(rng.randrange(2))
            if row % 50 == 7:
                jpg[1] = jpg[1][: len(jpg[1]) // 3]  # truncated: quarantined
            rows.append({
                "are_different": True, "best_image_uid": f"u{row}-0", "caption": f"scene {row}",
                "created_at": base + timedelta(seconds=row), "has_label": row % 20 != 11,
                "image_0_uid": f"u{row}-0", "image_0_url": "", "image_1_uid": f"u{row}-1",
                "image_1_url": "", "jpg_0": jpg[0], "jpg_1": jpg[1], "label_0": label,
                "label_1": 1.0 - label, "model_0": "sd-1.5", "model_1": "sdxl",
                "ranking_id": 10**6 + row, "user_id": row % 97, "num_example_per_prompt": 1,
            })
        table = pa.Table.from_pylist(rows, schema=PICKAPIC_SCHEMA)
        pq.write_table(table, data / f"train-{index:05d}-of-{files:05d}.parquet",
                       row_group_size=ROW_GROUP_ROWS, use_dictionary=["caption", "model_0"])
    return sum(f.stat().st_size for f in data.iterdir())


def save_to_disk_copy(parquet_folder: Path, target: Path, scratch: Path) -> None:
    """The same rows as a DatasetDict saved with `save_to_disk`."""
    import datasets

    files = sorted(str(f) for f in (parquet_folder / "data").glob("*.parquet"))
    dataset = datasets.Dataset.from_parquet(files, cache_dir=str(scratch))
    datasets.DatasetDict({"train": dataset}).save_to_disk(str(target), max_shard_size="100MB")
    dataset.cleanup_cache_files()
    shutil.rmtree(scratch, ignore_errors=True)


# The child reports its own peak RSS: VmHWM belongs to the address space it exec'd into, while
# Linux's ru_maxrss for a child also counts the parent's RSS at fork (here: the generator's).
_CHILD = """
import json, resource, sys
from pathlib import Path
from smpo_core.pickapic import download_pairs, iter_source
report = {}
if len(sys.argv) > 1:
    state = download_pairs(iter_source(sys.argv[1], "train"), Path(sys.argv[2]), int(sys.argv[3]))
    report = {"pairs": state.pairs, "rows": state.source_rows}
try:
    status = open("/proc/self/status").read().split("VmHWM:")[1]
    report["peak_kib"] = int(status.split()[0])
except OSError:
    report["peak_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(report))
"""


def measure(source: Path | None, out: Path, shard_rows: int) -> tuple[float, dict]:
    """Peak RSS (MiB) of one download in a fresh process, and what it reported."""
    args = [sys.executable, "-c", _CHILD]
    if source:
        args += [str(source), str(out), str(shard_rows)]
    root = Path(__file__).resolve().parents[1]
    child = subprocess.run(args, stdout=subprocess.PIPE, cwd=root, check=False,
                           env=os.environ | {"PYTHONPATH": str(root)})
    if child.returncode:
        raise SystemExit(f"download of {source} exited with {child.returncode}")
    report = json.loads(child.stdout)
    return report["peak_kib"] / 1024, report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1000,
                        help="N (default 1000: past the allocator's warm-up of a few hundred rows)")
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--layouts", nargs="+", default=["parquet", "save_to_disk"],
                        choices=["parquet", "save_to_disk"])
    parser.add_argument("--shard-rows", type=int, default=DownloadSettings().shard_rows)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where to build the sources (default: a temporary folder)")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="smpo-bench-"))
    rng = random.Random(0)
    pool = [_drawing(rng) for _ in range(POOL)]
    print(f"image pool: {POOL} JPEGs, mean {sum(map(len, pool)) / POOL / 1024:.0f} KiB; "
          f"shard_rows={args.shard_rows}; work dir {work}")
    baseline, _ = measure(None, work, 0)
    print(f"import only: peak RSS {baseline:.0f} MiB")
    ratios = {}
    try:
        for layout in args.layouts:
            peaks = []
            for pairs in (args.pairs, args.pairs * args.factor):
                source = work / f"parquet-{pairs}"
                if not source.exists():
                    size = write_source(source, pairs, pool)
                else:
                    size = sum(f.stat().st_size for f in (source / "data").iterdir())
                if layout == "save_to_disk":
                    saved = work / f"saved-{pairs}"
                    if not saved.exists():
                        save_to_disk_copy(source, saved, work / "scratch")
                    source = saved
                out = work / f"out-{layout}-{pairs}"
                shutil.rmtree(out, ignore_errors=True)
                started = time.perf_counter()
                peak, report = measure(source, out, args.shard_rows)
                shutil.rmtree(out, ignore_errors=True)
                peaks.append(peak)
                print(f"{layout:>12} {pairs:>6} pairs ({size / 2**20:6.0f} MiB source): "
                      f"peak RSS {peak:6.0f} MiB, {report['pairs']} pairs kept, "
                      f"{time.perf_counter() - started:5.1f} s")
            ratios[layout] = peaks[1] / peaks[0]
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    worst = max(ratios.values())
    print("ratios (10N / N): " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items())
          + f"; limit {LIMIT}")
    return 0 if worst <= LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
