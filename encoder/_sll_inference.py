"""Fast inference kernels for frozen SLL layers on CPU (no autograd): the same formulas as layers.py.

A frozen SLLConv2d computes h(x) = x − conv_transpose2d(ReLU(conv2d(x, K) + b), K̃) with K̃ = 2·T⁻¹K.
With an inner dimension of 5 and 45 channels (LipSim-small) both convolutions are poor fits for
oneDNN/MKL convolution kernels (5 output channels, 9 MB per image per tensor), so this module writes
each layer as two 45×45 matrix products. X is the image pixel-major with a zero border of p = k//2,
X[P, c] for padded pixels P (a (H+2p)(W+2p) × C matrix); Z and R are channel-major:

    Z = K_all · Xᵀ                   K_all[(ki,kj,o), c] = K[o, c, ki, kj]     (k²·inner × C)
    r[o, i, j] = ReLU(b_o + Σ_{ki,kj} Z[(ki,kj,o), (i+ki, j+kj)])             (shift-and-sum)
    R[(ki,kj,o), (i+p, j+p)] = r_padded[o, i+ki, j+kj]                        (im2col of r)
    X ← X − Rᵀ · K̃_all  (one in-place GEMM, the residual fused)  K̃_all[(ki,kj,o), c] = K̃[o, c, k−1−ki, k−1−kj]

which is conv2d then conv_transpose2d written out tap by tap (the borders of X and R stay zero). Of
the layouts tried (docs/benchmarks/throughput.md) this one is the fastest: MKL runs these skinny
products fastest with X pixel-major, and the shift-and-sum and im2col copy whole image rows when Z
and R are channel-major. Each image goes through the whole trunk on its own so
that its buffers (≈ 9 MB each at 224 px) stay in cache; the dense layers then run on the whole batch.
With torch set to n > 1 threads, n worker threads share the work with every product single-threaded
(torch's thread count is 1 for the duration of the call, restored after): one image per thread when
the batch has n images or more, else each image in n blocks of rows (one barrier per layer, see
_trunk_split_jobs). Letting
torch parallelise each of the ~280 mid-sized operations per image instead is slower, and collapses
on a busy machine, where every operation waits for its slowest thread.

Used by LipSimNet.features only when every SLL layer is frozen, nothing needs a gradient and the
tensor is on the CPU; tests/test_sll_inference.py compares it with the layer-by-layer unfrozen
reference (max |Δ| ≤ 1e-5).
"""
from __future__ import annotations

import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch
import torch.autograd.forward_ad as fwAD

__all__ = ["conv_trunk_inference", "linear_inference", "can_use_fast_path"]


def can_use_fast_path(x: torch.Tensor, module: torch.nn.Module) -> bool:
    """True when the inference kernels give the same result as the autograd path and are faster."""
    if x.device.type != "cpu" or not x.is_floating_point():
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters())):
        return False
    # torch.func transforms (jvp, vmap, grad) and forward-mode AD carry derivatives that requires_grad
    # does not show; the kernels below (no_grad, out= products) would drop or reject them.
    if torch._C._functorch.is_functorch_wrapped_tensor(x) or fwAD.unpack_dual(x).tangent is not None:
        return False
    return True


def _tap_matrices(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(K_all, K̃_all), both (k²·inner, C), of a frozen SLLConv2d (see the module doc)."""
    inner, channels, k, _ = layer.kernel.shape
    folded = layer._fresh_fold()  # refolded first if the weights changed in place
    k_all = layer.kernel.permute(2, 3, 0, 1).reshape(k * k * inner, channels).contiguous()
    # conv_transpose2d correlates with the flipped kernel: flipping here lets the im2col of r use
    # non-negative strides (one strided copy instead of one copy per tap).
    folded_all = folded.flip(2, 3).permute(2, 3, 0, 1).reshape(k * k * inner, channels).contiguous()
    return k_all, folded_all


# Held while a call has set torch's (process-wide) thread count to 1, so that concurrent calls never
# save and restore each other's value; a call that finds it held runs its images on its own thread.
_THREADS_LOCK = threading.Lock()


@torch.no_grad()
def conv_trunk_inference(x: torch.Tensor, layers: Sequence) -> torch.Tensor:
    """Frozen SLLConv2d `layers` (one shape, C channels) on x (B, c ≤ C, H, W), zero-padded to C
    channels as PadChannels does. Returns (B, C, H, W) in channels_last memory format."""
    if not layers:
        return x
    first = layers[0]
    c, inner, k = first.channels, first.inner, first.kernel_size
    if any((l.channels, l.inner, l.kernel_size) != (c, inner, k) or not l.frozen for l in layers):
        raise ValueError("conv_trunk_inference needs frozen layers of one shape")
    b, cx, h, w = x.shape
    if cx > c:
        raise ValueError(f"cannot pad {cx} channels down to {c}")
    mats = [_tap_matrices(l) for l in layers]
    biases = [l.bias.reshape(inner, 1, 1) for l in layers]
    out = torch.empty(b, c, h, w, memory_format=torch.channels_last, dtype=x.dtype, device=x.device)
    threads = torch.get_num_threads()
    if threads == 1 or not _THREADS_LOCK.acquire(blocking=False):
        _trunk_images(x, range(b), out, mats, biases, k)
        return out
    try:
        inference = torch.is_inference_mode_enabled()  # grad modes are thread-local

        def run_all(pool, jobs) -> None:
            def job_in_mode(job):
                with torch.inference_mode(inference), torch.no_grad():
                    job()

            for future in [pool.submit(job_in_mode, job) for job in jobs]:
                future.result()

        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(threads) as pool:
                if b >= threads:  # one image per thread at a time
                    run_all(pool, [functools.partial(_trunk_images, x, range(j, b, threads), out, mats, biases, k)
                                   for j in range(threads)])
                else:  # fewer images than threads: each image in row blocks, one per thread
                    parts = min(threads, h)
                    for i in range(b):
                        run_all(pool, _trunk_split_jobs(x, i, out, mats, biases, k, parts))
        finally:
            torch.set_num_threads(threads)
    finally:
        _THREADS_LOCK.release()
    return out


def _trunk_split_jobs(x, i, out, mats, biases, k: int, parts: int) -> list:
    """Jobs that run the trunk on image x[i] together, each updating one block of rows of X in place.

    Z of a row needs only X of that row, so each job computes Z for its own rows into a shared Z;
    after a barrier every job reads the Z rows it needs (its own ±2p), and updates its own rows of X.
    Z alternates between two buffers, so that a job writing the next layer's Z never overwrites rows a
    slower job still reads (it cannot get two layers ahead: it would pass a barrier the other has not
    reached). One barrier per layer; a job that fails breaks it, so that the others stop too.
    """
    c, inner = out.shape[1], biases[0].shape[0]
    cx, h, w = x.shape[1:]
    p, kk = k // 2, k * k * inner
    hp, wp = h + 2 * p, w + 2 * p
    opts = dict(dtype=x.dtype, device=x.device)
    xp = torch.zeros(hp, wp, c, **opts)  # the image being transformed, pixel-major, zero border
    xp[p:p + h, p:p + w, :cx].copy_(x[i].permute(1, 2, 0))
    xf = xp.view(hp * wp, c)
    zs = [torch.zeros(kk, hp, wp, **opts) for _ in range(2)]  # border rows stay zero (Z of zero rows)
    bounds = [p + (h * j) // parts for j in range(parts + 1)]
    barrier = threading.Barrier(parts)
    taps = [(ki, kj) for ki in range(k) for kj in range(k)]

    def job(j: int) -> None:
        r0, r1 = bounds[j], bounds[j + 1]  # padded rows of X this job updates
        q0 = r0 - p  # rp holds r of padded rows [r0−p, r1+p), zero outside the interior rows
        a0, a1 = max(q0, p) - q0, min(r1 + p, hp - p) - q0  # of which computed: local rows [a0, a1)
        rp = torch.zeros(inner, r1 - r0 + 2 * p, wp, **opts)
        rcol = torch.zeros(kk, r1 - r0, wp, **opts)
        rf = rcol.view(kk, -1)
        r_in = rp[:, a0:a1, p:p + w]
        r_taps = rp.as_strided((k, k, inner, r1 - r0, w), (wp, 1, (r1 - r0 + 2 * p) * wp, wp, 1))
        rcol_in = rcol.view(k, k, inner, r1 - r0, wp)[..., p:p + w]

        try:
            for layer, ((k_all, folded_all), bias) in enumerate(zip(mats, biases)):
                z = zs[layer % 2]
                torch.mm(k_all, xf[r0 * wp:r1 * wp].t(), out=z.view(kk, -1)[:, r0 * wp:r1 * wp])
                barrier.wait()
                for t, (ki, kj) in enumerate(taps):
                    tap = z[t * inner:(t + 1) * inner, q0 - p + a0 + ki:q0 - p + a1 + ki, kj:kj + w]
                    if t == 0:
                        r_in.copy_(tap)
                    else:
                        r_in.add_(tap)
                r_in.add_(bias).relu_()
                rcol_in.copy_(r_taps)
                xf[r0 * wp:r1 * wp].addmm_(rf.t(), folded_all, alpha=-1)
        except BaseException:
            barrier.abort()
            raise
        out[i, :, r0 - p:r1 - p].permute(1, 2, 0).copy_(xp[r0:r1, p:p + w])

    return [functools.partial(job, j) for j in range(parts)]


def _trunk_images(x, images, out, mats, biases, k: int) -> None:
    """The trunk on x[i] → out[i] for i in `images`, one image at a time, with buffers of its own."""
    c, inner = out.shape[1], biases[0].shape[0]
    cx, h, w = x.shape[1:]
    p, kk = k // 2, k * k * inner
    hp, wp = h + 2 * p, w + 2 * p
    n = hp * wp
    taps = [(ki, kj) for ki in range(k) for kj in range(k)]
    opts = dict(dtype=x.dtype, device=x.device)
    xp = torch.zeros(hp, wp, c, **opts)  # the image being transformed, pixel-major, zero border
    z = torch.empty(kk, hp, wp, **opts)
    rp = torch.zeros(inner, hp, wp, **opts)  # ReLU output, zero border
    rcol = torch.zeros(kk, hp, wp, **opts)  # im2col of rp for the transposed product
    xf, zf, rf = xp.view(n, c), z.view(kk, n), rcol.view(kk, n)
    x_in, r_in = xp[p:p + h, p:p + w], rp[:, p:p + h, p:p + w]
    # (ki, kj, o, i, j) ↦ rp[o, i+ki, j+kj], and the interior of rcol seen as (k, k, inner, h, w)
    r_taps = rp.as_strided((k, k, inner, h, w), (wp, 1, n, wp, 1))
    rcol_in = rcol.view(k, k, inner, hp, wp)[..., p:p + h, p:p + w]

    def tap_slice(ki, kj):
        s = (ki * k + kj) * inner
        return z[s:s + inner, ki:ki + h, kj:kj + w]

    for i in images:
        x_in[..., :cx].copy_(x[i].permute(1, 2, 0))
        x_in[..., cx:].zero_()
        for (k_all, folded_all), bias in zip(mats, biases):
            torch.mm(k_all, xf.t(), out=zf)
            r_in.copy_(tap_slice(*taps[0]))
            for ki, kj in taps[1:]:
                r_in.add_(tap_slice(ki, kj))
            r_in.add_(bias).relu_()
            rcol_in.copy_(r_taps)
            xf.addmm_(rf.t(), folded_all, alpha=-1)
        out[i].permute(1, 2, 0).copy_(x_in)


@torch.no_grad()
def linear_inference(x: torch.Tensor, layer) -> torch.Tensor:
    """Frozen SLLLinear: x − ReLU(x Wᵀ + b) · W̃ with bias and residual fused into the GEMMs."""
    folded = layer._fresh_fold()
    res = torch.addmm(layer.bias, x, layer.weight.t()).relu_()
    return torch.addmm(x, res, folded, alpha=-1)
