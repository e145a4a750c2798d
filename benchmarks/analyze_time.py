"""Time fishercore.analyze on a 64-128-128-10 tanh MLP and 1,797 inputs of width 64 (digits-sized).

Run: python benchmarks/analyze_time.py [--repeat 5] [--batch-size 256]
Prints the median wall time of analyze and of each estimate (float64, NumPy backend).
"""

import argparse
import statistics
import time

import numpy as np

import fishercore as fc
from fishercore.backends import mlp


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    widths = [64, 128, 128, 10]
    layers = [(rng.normal(size=(o, i)) / np.sqrt(i), rng.normal(size=o) * 0.1) for i, o in zip(widths[:-1], widths[1:])]
    model = mlp.MLP(layers, "tanh")
    X = rng.normal(size=(1797, 64))
    jobs = {
        "analyze": lambda: fc.analyze(model, X, batch_size=args.batch_size),
        "estimate i1 (M=1)": lambda: fc.estimate(model, X, estimator="i1", seed=0, batch_size=args.batch_size),
        "estimate i2 (M=1)": lambda: fc.estimate(model, X, estimator="i2", seed=0, batch_size=args.batch_size),
    }
    print(f"{'job':<20} {'median [ms]':>12}   (64-128-128-10 tanh, n=1797, float64, numpy, batch {args.batch_size})")
    for name, job in jobs.items():
        job()  # warm-up
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            job()
            times.append(time.perf_counter() - t0)
        print(f"{name:<20} {1e3 * statistics.median(times):>12.1f}")


if __name__ == "__main__":
    main()
