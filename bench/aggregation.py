"""Time every aggregation method against the memory-bandwidth floor.

For each n (models) × P (float32 parameters) and method, one round runs as the round engine
would run it: models are generated one at a time and handed to ``add`` (streaming methods fold
them, robust methods hold them as their accumulator does), then ``result()``. Generation is not
timed. Each round runs ``--repeat`` times and the fastest is reported (the machine may be
shared). The floor is n·P·4 B / the read bandwidth measured here (the best of five ``np.sum``
over 1 GiB). FedAvg's peak extra memory (tracemalloc, in a fresh subprocess) is reported for
each n.

    python bench/aggregation.py                # n ∈ {10, 100} × P ∈ {1M, 10M}, all methods
    python bench/aggregation.py --quick        # small sizes, a few seconds
    python bench/aggregation.py --n 100 --p 10000000 --methods fedavg krum
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _blas_threads_from_argv() -> None:
    # BLAS reads its thread count when NumPy is first imported: honour --threads before that.
    argv = sys.argv[1:]
    if "--threads" in argv and argv.index("--threads") + 1 < len(argv):
        count = argv[argv.index("--threads") + 1]
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = count


if __name__ == "__main__":
    _blas_threads_from_argv()

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from aggregator.strategies import STRATEGIES, create_strategy  # noqa: E402
from aggregator.strategies.base import RoundAccumulator  # noqa: E402

METHODS = tuple(STRATEGIES)


def measure_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: the best of ``repeats`` sums over an array beyond the caches."""
    a = np.ones(nbytes // 4, dtype=np.float32)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best


class ModelSource:
    """Distinct float32 models generated one at a time (base + scaled noise from a small pool)."""

    def __init__(self, p: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.base = rng.standard_normal(p, dtype=np.float32)
        self.noise = [rng.standard_normal(p, dtype=np.float32) * np.float32(0.01) for _ in range(4)]

    def models(self, n: int) -> Iterator[np.ndarray[Any, np.dtype[np.float32]]]:
        for i in range(n):
            x = np.multiply(self.noise[i % 4], np.float32(1.0 + i / n))
            x += self.base
            yield x


def settings_for(method: str, n: int, maxiter: int) -> dict[str, Any]:
    f = max(1, n // 10)
    if method in ("krum", "krum_averaging", "bulyan"):
        return {"f": f}
    if method == "trimmed_mean":
        return {"trim": f}
    if method == "geometric_median":
        return {"maxiter": maxiter, "ftol": 0.0}
    return {}


def run_round(method: str, n: int, source: ModelSource, maxiter: int) -> dict[str, Any]:
    strategy = create_strategy(method, settings_for(method, n, maxiter))
    acc: RoundAccumulator = strategy.begin({"w": source.base})
    t_add = 0.0
    for x in source.models(n):
        t = time.perf_counter()
        acc.add({"w": x}, 1.0 + (x.shape[0] % 7))
        t_add += time.perf_counter() - t
        del x
    t = time.perf_counter()
    out = acc.result()
    t_result = time.perf_counter() - t
    info: dict[str, Any] = {"add_s": t_add, "result_s": t_result, "total_s": t_add + t_result}
    trace = getattr(acc, "trace", None)
    if trace is not None:
        info["iterations"] = trace.iterations
    acc.close()
    del out
    return info


def fedavg_peak_memory(n: int, p: int) -> int:
    """Peak bytes FedAvg allocates beyond the inputs over a round (in this process)."""
    source = ModelSource(p)
    tracemalloc.start()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    acc = create_strategy("fedavg").begin({})
    for x in source.models(n):
        acc.add({"w": x}, 1.0)
        del x
    out = acc.result()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del out
    # The driver holds one model of its own at a time; everything else is the accumulator's
    # (running sum, pending group, scratch, result).
    return peak - before - p * 4


def fedavg_peak_memory_subprocess(n: int, p: int) -> int:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from bench.aggregation import "
        "fedavg_peak_memory as f; print(f(int(sys.argv[2]), int(sys.argv[3])))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(ROOT), str(n), str(p)],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (n 10, 30; P 100k, 1M)")
    parser.add_argument("--n", type=int, nargs="+", help="numbers of models (default 10 100)")
    parser.add_argument("--p", type=int, nargs="+", help="parameters per model (1M 10M)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--maxiter", type=int, default=100, help="geometric median iterations")
    parser.add_argument("--repeat", type=int, default=2, help="rounds per case; best reported")
    parser.add_argument("--skip-memory", action="store_true", help="skip FedAvg's peak memory")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON lines too")
    parser.add_argument(
        "--threads", type=int, help="BLAS threads (default: the library's; 1 on a busy machine)"
    )
    args = parser.parse_args(argv)
    ns = args.n or ([10, 30] if args.quick else [10, 100])
    ps = args.p or ([100_000, 1_000_000] if args.quick else [1_000_000, 10_000_000])

    bandwidth = measure_bandwidth(128 << 20 if args.quick else 1 << 30)
    threads = os.environ.get("OPENBLAS_NUM_THREADS", "library default")
    print(
        f"read bandwidth (np.sum over {128 if args.quick else 1024} MiB): "
        f"{bandwidth / 1e9:.1f} GB/s; BLAS threads: {threads}; {os.cpu_count()} CPUs"
    )
    header = f"{'method':<18}{'n':>5}{'P':>11}{'add s':>9}{'result s':>10}{'total s':>9}"
    header += f"{'floor s':>9}{'x floor':>9}"
    print(header)
    rows = []
    for p in ps:
        source = ModelSource(p)
        for n in ns:
            floor = n * p * 4 / bandwidth
            for method in args.methods:
                runs = [run_round(method, n, source, args.maxiter) for _ in range(args.repeat)]
                info = min(runs, key=lambda r: float(r["total_s"]))
                row = {"method": method, "n": n, "p": p, "floor_s": floor, **info}
                rows.append(row)
                extra = f"  ({info['iterations']} iterations)" if "iterations" in info else ""
                print(
                    f"{method:<18}{n:>5}{p:>11}{info['add_s']:>9.3f}{info['result_s']:>10.3f}"
                    f"{info['total_s']:>9.3f}{floor:>9.4f}{info['total_s'] / floor:>9.1f}{extra}",
                    flush=True,
                )
        del source
    if not args.skip_memory:
        p = max(ps)
        print(f"FedAvg peak extra memory, P = {p} float32 ({p * 4 / 2**20:.0f} MiB per model):")
        for n in ns:
            peak = fedavg_peak_memory_subprocess(n, p)
            rows.append({"method": "fedavg", "n": n, "p": p, "peak_extra_bytes": peak})
            print(f"  n = {n:>4}: {peak / 2**20:8.1f} MiB  ({peak / (p * 4):.2f} models)")
    if args.json:
        for row in rows:
            print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
