"""How long `prepare check` takes on 1,000 images (target: ≤ 30 s on a 2-core machine).

Generates 1,000 distinct captioned images (half PNG, half JPEG) per size in a temporary folder, then times
`check_dataset` with one decoding thread and with the default thread count, side by side in one run.

    python benchmarks/prepare_check.py [--n 1000] [--sizes 128 512]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from lorakit.dataprep import check_dataset
from lorakit.dataprep.samples import write_clean_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512])
    args = parser.parse_args()
    default_workers = min(8, os.cpu_count() or 1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            folder = Path(tmp) / f"s{size}"
            t = time.perf_counter()
            write_clean_dataset(folder, args.n, size=(size, size * 3 // 4))
            made = time.perf_counter() - t
            mb = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
            times = {}
            for workers in sorted({1, default_workers}):
                t = time.perf_counter()
                report = check_dataset(folder, resolution=512, workers=workers)
                times[workers] = time.perf_counter() - t
                assert report.n_images == args.n and "unreadable" not in report.problems
            rows.append((size, mb, made, times))
    print(f"prepare check on {args.n} images ({os.cpu_count()} CPUs; target ≤ 30 s)")
    print(f"{'image size':>12} {'MB':>7} {'generate s':>11} " + " ".join(f"{f'{w} thread(s) s':>14}" for w in
                                                                      sorted(rows[0][3])) + f" {'speed-up':>9}")
    for size, mb, made, times in rows:
        ws = sorted(times)
        speedup = times[ws[0]] / times[ws[-1]]
        print(f"{f'{size}x{size * 3 // 4}':>12} {mb:7.1f} {made:11.1f} " + " ".join(f"{times[w]:14.2f}" for w in ws)
              + f" {speedup:8.2f}x")


if __name__ == "__main__":
    main()
