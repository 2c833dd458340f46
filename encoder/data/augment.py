"""Views and realistic edits for training, driven by an explicit `torch.Generator`.

Every random choice draws from the generator it is given, so a training step seeded from
(seed, step) produces the same views after an interruption and resume (no global RNG state).

    random_resized_crop(img, size, g)          crop of random area/aspect, resized (LipSim/SimCLR)
    lipsim_view(img, size, g)                  crop + horizontal flip + colour jitter + grayscale
    realistic_edit(x, g, kind, strength)       JPEG, blur, noise, colour shift, shift, rescale
Inputs and outputs are float (3, H, W) in [0, 1].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..preprocess import resize

__all__ = ["EDIT_KINDS", "uniform", "center_view", "random_resized_crop", "color_jitter", "to_grayscale", "lipsim_view",
           "realistic_edit", "random_edit"]

EDIT_KINDS = ("jpeg", "blur", "noise", "color", "shift", "rescale")


def uniform(g: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi] (inclusive)."""
    return int(torch.randint(lo, hi + 1, (), generator=g))


def random_resized_crop(img: torch.Tensor, size: int, g: torch.Generator,
                        scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """torchvision's RandomResizedCrop (area fraction in `scale`, log-uniform aspect), float bilinear."""
    _, h, w = img.shape
    area = h * w
    for _ in range(10):
        target = area * uniform(g, *scale)
        aspect = math.exp(uniform(g, math.log(ratio[0]), math.log(ratio[1])))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = randint(g, 0, h - ch), randint(g, 0, w - cw)
            return resize(img[:, top:top + ch, left:left + cw], size)
    side = min(h, w)  # fallback: central square
    top, left = (h - side) // 2, (w - side) // 2
    return resize(img[:, top:top + side, left:left + side], size)


def center_view(img: torch.Tensor, size: int) -> torch.Tensor:
    """The central square crop of (3, H, W), resized to size × size (a deterministic view)."""
    _, h, w = img.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return resize(img[:, top:top + side, left:left + side], size)


def to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, repeated to 3 channels."""
    y = 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]
    return y.expand(3, -1, -1).clone()


def color_jitter(x: torch.Tensor, g: torch.Generator, brightness=0.4, contrast=0.4, saturation=0.4) -> torch.Tensor:
    """Brightness, contrast and saturation factors in [1 − a, 1 + a], applied in random order."""
    ops = torch.randperm(3, generator=g).tolist()
    for op in ops:
        if op == 0:
            x = x * uniform(g, 1 - brightness, 1 + brightness)
        elif op == 1:
            m = to_grayscale(x).mean()
            x = (x - m) * uniform(g, 1 - contrast, 1 + contrast) + m
        else:
            gray = to_grayscale(x)
            x = (x - gray) * uniform(g, 1 - saturation, 1 + saturation) + gray
        x = x.clamp(0, 1)
    return x


def lipsim_view(img: torch.Tensor, size: int, g: torch.Generator, scale=(0.2, 1.0), jitter_p: float = 0.8,
                gray_p: float = 0.2) -> torch.Tensor:
    """One LipSim/SimCLR-style view: random resized crop, horizontal flip (p = ½), colour jitter
    (p = jitter_p), grayscale (p = gray_p)."""
    x = random_resized_crop(img, size, g, scale=scale)
    if uniform(g) < 0.5:
        x = x.flip(-1)
    if uniform(g) < jitter_p:
        x = color_jitter(x, g)
    if uniform(g) < gray_p:
        x = to_grayscale(x)
    return x


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[0]
    xp = F.pad(x[None], (radius, radius, radius, radius), mode="reflect")
    xp = F.conv2d(xp, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    xp = F.conv2d(xp, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return xp[0]


def _jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    import io

    import numpy as np
    from PIL import Image

    from ..image import to_pil

    buf = io.BytesIO()
    to_pil(x).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255.0)


def realistic_edit(x: torch.Tensor, g: torch.Generator, kind: str, strength: float) -> torch.Tensor:
    """An everyday edit of `x` (3, S, S) with `strength` in [0, 1] (0 ≈ unchanged, 1 = strong).

    jpeg: quality 95 → 10; blur: Gaussian σ 0.2 → 2.2 px; noise: Gaussian σ 0.005 → 0.1;
    color: brightness/contrast/saturation/per-channel gain up to ±30 %; shift: translation up to
    12 % of the side (reflect padding); rescale: zoom-in crop up to 25 % then back to S, or down-
    and up-sampling to as little as 35 % of the side.
    """
    s = float(min(max(strength, 0.0), 1.0))
    size = x.shape[-1]
    if kind == "jpeg":
        return _jpeg(x, round(95 - 85 * s))
    if kind == "blur":
        return _gaussian_blur(x, 0.2 + 2.0 * s)
    if kind == "noise":
        return (x + (0.005 + 0.095 * s) * torch.randn(x.shape, generator=g)).clamp(0, 1)
    if kind == "color":
        a = 0.3 * s
        x = color_jitter(x, g, brightness=a, contrast=a, saturation=a)
        gain = 1 + a * (2 * torch.rand(3, 1, 1, generator=g) - 1)
        return (x * gain).clamp(0, 1)
    if kind == "shift":
        m = int(round(0.12 * size * s))
        if m == 0:
            return x
        dx, dy = randint(g, -m, m), randint(g, -m, m)
        xp = F.pad(x[None], (m, m, m, m), mode="reflect")[0]
        return xp[:, m + dy:m + dy + x.shape[1], m + dx:m + dx + x.shape[2]]
    if kind == "rescale":
        if uniform(g) < 0.5:
            crop = max(2, int(round(size * (1 - 0.25 * s))))
            top, left = randint(g, 0, size - crop), randint(g, 0, size - crop)
            return resize(x[:, top:top + crop, left:left + crop], size)
        low = max(4, int(round(size * (1 - 0.65 * s))))
        return resize(resize(x, low), size).clamp(0, 1)
    raise ValueError(f"unknown edit {kind!r}; known: {', '.join(EDIT_KINDS)}")


def random_edit(x: torch.Tensor, g: torch.Generator, max_strength: float = 1.0, n_max: int = 2,
                kinds=EDIT_KINDS) -> torch.Tensor:
    """1..n_max realistic edits of random kinds and strengths in [0, max_strength]."""
    for _ in range(randint(g, 1, n_max)):
        kind = kinds[randint(g, 0, len(kinds) - 1)]
        x = realistic_edit(x, g, kind, uniform(g, 0, max_strength))
    return x
