"""The int8 scan kernel of `index.codes` (numba; imported only when codes are scanned). Its float32
operations and their error are stated and bounded in `index.codes`' module doc."""
import numpy as np
from numba import njit


@njit(nogil=True, fastmath={"reassoc", "contract"}, cache=True)
def upper(codes, scale, resid, q, nu, out, maxima, block):  # pragma: no cover (compiled)
    """out[r] = fl(fl(scale[r]·fl(Σ_i q_i·codes[r, i])) + fl(nu·resid[r])), float32 throughout, and
    maxima[b] = max(out[b·block : (b + 1)·block]) (the last block may be shorter)."""
    n, d = codes.shape
    top = -np.inf
    for r in range(n):
        acc = np.float32(0.0)
        for i in range(d):
            acc += q[i] * np.float32(codes[r, i])
        v = acc * scale[r] + nu * resid[r]
        out[r] = v
        if v > top:
            top = v
        if (r + 1) % block == 0 or r == n - 1:
            maxima[r // block] = top
            top = -np.inf


@njit(nogil=True, cache=True)
def quantize(e, codes, scale, delta):  # pragma: no cover (compiled)
    """Per row of float32 e: scale = fl32(max|e_i| / 127), codes = clip(rint(e_i / scale), ±127) (0 where scale
    is 0), delta = ‖e − scale·codes‖ in float64 (strict IEEE arithmetic: no fastmath)."""
    n, d = e.shape
    for r in range(n):
        peak = 0.0
        for i in range(d):
            peak = max(peak, abs(np.float64(e[r, i])))
        a = np.float32(peak / 127.0)
        a64 = np.float64(a)
        total = 0.0
        for i in range(d):
            x = np.float64(e[r, i])
            w = 0.0
            if a64 > 0.0:
                w = min(127.0, max(-127.0, np.rint(x / a64)))
            codes[r, i] = np.int8(w)
            diff = x - a64 * w
            total += diff * diff
        scale[r] = a
        delta[r] = np.sqrt(total)
