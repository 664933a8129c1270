"""What do the teacher cache's checksums cost? Opening a cache with and without them.

`TeacherCache.open_valid` hashes every field file once (sha256) before the cache is used;
`TeacherCache(verify=False)` maps the files without reading them. Both are timed on caches of
the demo's size (MNIST-1D: 3,500 x 10 float32), MNIST's (55,000 x 10) and 1 GiB (262,144 x
1,024), each built once by `build_cache` (an identity "teacher" over random inputs) in a
temporary directory; the build time is reported too. One intra-op thread, median of
`--repeats` opens (the files are in the page cache after the build: this is hashing, not disk).

Run:  .venv/bin/python benchmarks/bench_checksum.py [--repeats 5] [--no-large]
The last line reads `open_ms_demo=<x> open_ms_mnist=<y> open_s_1gib=<z> gib_per_s=<w>`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from kdistill.cache import CacheKey, TeacherCache, build_cache

SIZES = {"demo": (3500, 10), "mnist": (55000, 10), "1gib": (262144, 1024)}


def bench(name: str, shape: tuple[int, int], repeats: int, tmp: Path) -> dict[str, float]:
    key = CacheKey("bench", name)
    start = time.perf_counter()
    build_cache(tmp / name, nn.Identity(), torch.randn(*shape), key, batch_size=4096)
    build = time.perf_counter() - start
    checked, unchecked = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        cache, why = TeacherCache.open_valid(tmp / name, key)
        checked.append(time.perf_counter() - start)
        assert cache is not None, why
        start = time.perf_counter()
        TeacherCache(tmp / name, verify=False)
        unchecked.append(time.perf_counter() - start)
    mib = shape[0] * shape[1] * 4 / 2**20
    on, off = statistics.median(checked), statistics.median(unchecked)
    print(f"{name:<6} {mib:>10,.1f} {build:>9.3f} {on * 1000:>14.2f} {off * 1000:>14.2f} "
          f"{mib / 1024 / max(on - off, 1e-9):>8.2f}", flush=True)
    return {"open": on, "gib_per_s": mib / 1024 / max(on - off, 1e-9)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-large", action="store_true", help="skip the 1 GiB cache")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, one intra-op thread; median of {args.repeats} opens")
    print(f"{'cache':<6} {'MiB':>10} {'build s':>9} {'open ms (sum)':>14} "
          f"{'open ms (none)':>14} {'GiB/s':>8}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="kdistill-bench-") as tmp:
        for name, shape in SIZES.items():
            if name == "1gib" and args.no_large:
                continue
            results[name] = bench(name, shape, args.repeats, Path(tmp))
    last = results.get("1gib", results["mnist"])
    print(f"open_ms_demo={results['demo']['open'] * 1000:.2f} "
          f"open_ms_mnist={results['mnist']['open'] * 1000:.2f} "
          + (f"open_s_1gib={results['1gib']['open']:.2f} " if "1gib" in results else "")
          + f"gib_per_s={last['gib_per_s']:.2f}")


if __name__ == "__main__":
    main()
