#!/usr/bin/env python3
"""numpy's unfused W' = bf16(f32(W) + s·B·(M·A)), on the shapes and ranks of adapter-kernel-bench.

    python3 Benchmarks/numpy_kernel.py [--repeats 5] [--blas-info]

Prints the TSV that adapter-kernel-bench prints (shape, rank, threads, seconds, GB/s, GFLOP/s,
vectorised) with the same definitions: seconds = best of the repeats; GB/s = bf16 bytes read and
written (4 per weight) per second; GFLOP/s = 2·rows·cols·rank per second. Each timed call does
everything: bf16 → float32 by a shift, M·A, B·(M·A), scale, add, round to nearest even back to bf16.
Threads: what numpy's BLAS uses (all cores unless told otherwise); the elementwise steps are
single-threaded, as numpy is. --blas-info prints the BLAS numpy runs (threadpoolctl if installed,
else numpy.show_config) on stderr first.
"""
import argparse
import os
import sys
import time

import numpy as np


def blas_info():
    try:
        from threadpoolctl import threadpool_info
        rows = [f"{i.get('internal_api')} {i.get('version')} threads={i.get('num_threads')} "
                f"arch={i.get('architecture')} ({os.path.basename(i.get('filepath', ''))})"
                for i in threadpool_info() if i.get("user_api") == "blas"]
        return "threadpoolctl: " + ("; ".join(rows) or "no BLAS found")
    except ImportError:
        import io
        from contextlib import redirect_stdout
        buf = io.StringIO()
        with redirect_stdout(buf):
            np.show_config()
        lines = [ln.strip() for ln in buf.getvalue().splitlines() if "name" in ln or "version" in ln]
        return "numpy.show_config: " + " ".join(lines[:8])


def blas_threads():
    try:
        from threadpoolctl import threadpool_info
        n = [i.get("num_threads") for i in threadpool_info() if i.get("user_api") == "blas"]
        return n[0] if n else 1
    except ImportError:
        return os.cpu_count()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--blas-info", action="store_true")
    args = ap.parse_args()
    if args.blas_info:
        print(blas_info(), file=sys.stderr)
    threads = blas_threads()
    rng = np.random.default_rng(1)
    scale = np.float32(2.0)
    print("shape\trank\tthreads\tseconds\tGB/s\tGFLOP/s\tvectorised")
    for rows, cols in [(4096, 4096), (11008, 4096)]:
        # bf16 weights in [2^-7, 2^-6), as in adapter-kernel-bench
        w = (0x3C00 | rng.integers(0, 1024, size=(rows, cols), dtype=np.uint16)).astype(np.uint16)
        for k in [8, 16, 64]:
            a = (rng.standard_normal((k, cols), dtype=np.float32) * 1e-3)
            m = (rng.standard_normal((k, k), dtype=np.float32) * 1e-1)
            b = (rng.standard_normal((rows, k), dtype=np.float32) * 1e-3)
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                x = (w.astype(np.uint32) << 16).view(np.float32)
                d = b @ (m @ a)
                d *= scale
                x += d
                u = x.view(np.uint32)
                out = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
                times.append(time.perf_counter() - t0)
            del x, d, u, out
            best = min(times)
            n = rows * cols
            print(f"{rows}x{cols}\t{k}\t{threads}\t{best:.4f}\t{n * 4 / best / 1e9:.2f}\t"
                  f"{2 * n * k / best / 1e9:.1f}\tnumpy", flush=True)


if __name__ == "__main__":
    main()
