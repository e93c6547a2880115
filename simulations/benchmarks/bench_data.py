"""Cold and warm load times of PTB-XL through common.data.dataset.load_dataset.

    python -m simulations.benchmarks.bench_data [--root DIR] [--records N]

DIR defaults to $PTBXL_DIR, else ../shared/ptb-xl next to the project. The cold load reads every WFDB
record into a fresh cache folder (deleted afterwards); the warm loads hit that cache.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common.config import DataConfig
from common.data.dataset import load_dataset
from common.data.metadata import load_metadata


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", help="PTB-XL folder (default: $PTBXL_DIR, else ../shared/ptb-xl)")
    parser.add_argument("--records", type=int, help="first N records only (default: all)")
    parser.add_argument("--warm-repeats", type=int, default=3)
    args = parser.parse_args()
    root = args.root or os.environ.get("PTBXL_DIR")
    if not root:
        root = str(Path(__file__).resolve().parents[2] / ".." / "shared" / "ptb-xl")
    cache = tempfile.mkdtemp(prefix="fedecg-bench-cache-")
    try:
        cfg = DataConfig(root=root, cache_dir=cache, max_records=args.records)
        start = time.perf_counter()
        meta = load_metadata(cfg)
        metadata_s = time.perf_counter() - start

        start = time.perf_counter()
        dataset = load_dataset(cfg, progress=True)
        cold_s = time.perf_counter() - start

        warm = []
        for _ in range(args.warm_repeats):
            start = time.perf_counter()
            again = load_dataset(cfg, progress=False)
            warm.append(time.perf_counter() - start)
        assert (again.signals == dataset.signals).all()
        size_mb = sum(p.stat().st_size for p in Path(cache).iterdir()) / 2**20
        print(f"records: {len(dataset)} (metadata rows {len(meta)}), signals {dataset.signals.shape} float32")
        print(f"read_metadata + validation: {metadata_s:.2f} s")
        print(f"cold load (WFDB reads + cache write): {cold_s:.2f} s ({len(dataset) / cold_s:.0f} records/s)")
        print(f"warm load (cache hit), median of {len(warm)}: {statistics.median(warm):.2f} s "
              f"(all: {', '.join(f'{w:.2f}' for w in warm)})")
        print(f"cache file: {size_mb:.0f} MiB")
    finally:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
