"""Would fewer bits a code make the certified scan faster on two cores? The shipped int8 scan against a 4-bit one,
side by side (issue 15: the 2-core latency targets).

    python -m benchmarks.code_width --quick                        # 50,000 rows (a test runs it)
    python -m benchmarks.code_width --sizes 1000000 10000000

The int8 scan (`index._codes_kernel.upper`, what `index.codes.QuantizedCodes.scan` runs: D + 8 bytes a vector)
reads at the memory floor's pace on two threads only if its arithmetic keeps up. This measures whether it does, and
whether halving the bytes would help: a 4-bit kernel written here (not shipped; no proof of its bound is claimed) that
reads ⌈D/2⌉ + 8 bytes a vector — two codes c ∈ [0, 15] a byte, the low nibble for coordinate j and the high one for
j + ⌈D/2⌉, unpacked exactly in float32 (hi = ⌊b/16⌋, lo = b − 16·hi) — and computes the same shape of bound,
a·Σ q_i·(c_i − 8) + ν·δ, with a per-vector scale and residual. Both run on the same random codes (timing does not
depend on the values; the 4-bit kernel's sums are checked against float64), one thread, then split over two
threads at 64-row boundaries as `index.codes.scan_upper` splits its rows, each measurement repeated in alternating
order (medians), beside a pass that only reads the bytes of each layout (a bitwise OR of their 64-bit words over the
same threads: the memory floor). Writes benchmarks/results/code-width.json and .md (--out PREFIX).
"""
from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from numba import njit

from benchmarks._output import write_report
from benchmarks.certified_search import DIM
from benchmarks.index_speed import _machine

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 64


@njit(nogil=True, fastmath={"reassoc", "contract"}, cache=True)
def upper4(codes, scale, resid, qa, qb, nu, out):  # pragma: no cover (compiled)
    """out[r] = scale[r]·Σ_j (qa[j]·(lo_j − 8) + qb[j]·(hi_j − 8)) + nu·resid[r], b = codes[r, j] (uint8),
    hi = ⌊b/16⌋, lo = b − 16·hi (exact in float32)."""
    n, h = codes.shape
    for r in range(n):
        acc = np.float32(0.0)
        row = codes[r]
        for j in range(h):
            f = np.float32(row[j])
            hi = np.floor(f * np.float32(0.0625))
            acc += qa[j] * (f - np.float32(16.0) * hi - np.float32(8.0)) + qb[j] * (hi - np.float32(8.0))
        out[r] = acc * scale[r] + nu * resid[r]


@njit(nogil=True, cache=True)
def read_words(words, out, at):  # pragma: no cover (compiled)
    """out[at] = the bitwise OR of every 64-bit word (a pass that only reads the bytes)."""
    acc = np.uint64(0)
    for i in range(len(words)):
        acc |= words[i]
    out[at] = acc


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    cuts = np.unique(np.linspace(0, n // BLOCK, parts + 1).astype(np.int64) * BLOCK)
    cuts[-1] = n
    return list(zip(cuts[:-1].tolist(), cuts[1:].tolist()))


def run(n: int, repeats: int, seed: int = 0) -> dict:
    from index._codes_kernel import upper

    rng = np.random.default_rng(seed)
    half = -(-DIM // 2)
    c8 = rng.integers(-127, 128, (n, DIM), dtype=np.int8)
    c4 = rng.integers(0, 256, (n, half), dtype=np.uint8)
    scale = rng.random(n, dtype=np.float32) * np.float32(0.01)
    resid = rng.random(n, dtype=np.float32) * np.float32(0.01)
    q = rng.standard_normal(DIM).astype(np.float32)
    q /= np.linalg.norm(q)
    q2 = np.zeros(2 * half, np.float32)
    q2[:DIM] = q
    qa, qb = q2[:half].copy(), q2[half:].copy()
    nu = np.float32(1.0 + 1e-6)
    out = np.empty(n, np.float32)
    maxima = np.empty(-(-n // BLOCK), np.float32)
    words8 = np.concatenate([c8.reshape(-1).view(np.uint8), scale.view(np.uint8), resid.view(np.uint8)])
    words4 = np.concatenate([c4.reshape(-1), scale.view(np.uint8), resid.view(np.uint8)])
    words8 = words8[:len(words8) // 8 * 8].view(np.uint64)
    words4 = words4[:len(words4) // 8 * 8].view(np.uint64)
    ored = np.empty(2, np.uint64)

    def scan8(lo, hi):
        upper(c8[lo:hi], scale[lo:hi], resid[lo:hi], q, nu, out[lo:hi], maxima[lo // BLOCK:], BLOCK)

    def scan4(lo, hi):
        upper4(c4[lo:hi], scale[lo:hi], resid[lo:hi], qa, qb, nu, out[lo:hi])

    def floor_of(words):
        def one(lo, hi, at):
            read_words(words[lo * len(words) // n:hi * len(words) // n], ored, at)
        return one

    kernels = {"int8": scan8, "4-bit": scan4}
    floors = {"int8": floor_of(words8), "4-bit": floor_of(words4)}
    scan4(0, min(n, 1000))  # numba's cache loaded before anything is timed
    ref = ((c4[:1000] & 15).astype(np.float64) - 8) @ qa + ((c4[:1000] >> 4).astype(np.float64) - 8) @ qb
    check = float(np.abs(out[:1000] - (ref * scale[:1000] + resid[:1000] * float(nu))).max())
    scan8(0, min(n, 1000))
    read_words(words8[:8], ored, 0)
    pool = ThreadPoolExecutor(2)
    times: dict = {f"{name} {what} {threads}": [] for name in kernels for what in ("scan", "floor")
                   for threads in (1, 2)}
    for r in range(repeats):
        for name in (("int8", "4-bit") if r % 2 == 0 else ("4-bit", "int8")):
            for threads in (1, 2):
                cuts = _split(n, threads)
                t = time.perf_counter()
                list(pool.map(lambda c: kernels[name](*c), cuts))
                times[f"{name} scan {threads}"].append(time.perf_counter() - t)
                t = time.perf_counter()
                list(pool.map(lambda ic: floors[name](*ic[1], ic[0]), enumerate(cuts)))
                times[f"{name} floor {threads}"].append(time.perf_counter() - t)
    pool.shutdown()
    ms = {key: 1e3 * float(np.median(x)) for key, x in times.items()}
    return {"n": n, "dim": DIM, "bytes_per_vector": {"int8": DIM + 8, "4-bit": half + 8}, "repeats": repeats,
            "median_ms": ms, "four_bit_max_abs_error_vs_float64": check,
            "two_thread_ratio_int8_over_4bit": ms["int8 scan 2"] / ms["4-bit scan 2"]}


def table(report: dict) -> str:
    lines = ["| vectors | layout | bytes a vector | scan, 1 thread | scan, 2 threads | reading the bytes, 2 threads |",
             "|---|---|---|---|---|---|"]
    for row in report["rows"]:
        for name in ("int8", "4-bit"):
            m = row["median_ms"]
            lines.append(f"| {row['n']:,} | {name} | {row['bytes_per_vector'][name]} | {m[f'{name} scan 1']:.2f} ms | "
                         f"{m[f'{name} scan 2']:.2f} ms | {m[f'{name} floor 2']:.2f} ms |")
    lines.append("")
    lines.append("Two threads, int8 / 4-bit: " + ", ".join(f"{r['two_thread_ratio_int8_over_4bit']:.2f}× at "
                                                          f"{r['n']:,}" for r in report["rows"]))
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000])
    ap.add_argument("--repeats", type=int, default=15, help="measurements of each kernel (alternating; default 15)")
    ap.add_argument("--quick", action="store_true", help="50,000 vectors, 3 repeats: seconds")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "code-width"))
    args = ap.parse_args(argv)
    sizes, repeats = ([50_000], 3) if args.quick else (args.sizes, args.repeats)
    report = {"machine": _machine(), "rows": [run(n, repeats) for n in sizes]}
    return write_report(args.out, report, table(report))


if __name__ == "__main__":
    main()
