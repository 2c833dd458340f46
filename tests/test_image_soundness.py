"""Certificates over the file's own samples, for every image mode (encoder/image.py).

An independent attack broke the first landing's certificates for grayscale, alpha, CMYK, 16-bit and
colour-keyed files: the radius was computed over the 3-channel RGB image robret converts the file to,
while the file's own samples move less for the same change of RGB. These tests check, per mode:
  - the channel factor against an independent search of the conversion's Jacobian (and, for linear
    conversions, the exact largest singular value);
  - that each file format decodes to its true samples at its real depth (16-bit PGM and PNG included),
    and that discontinuous decodes (colour key, palette, reduced 16-bit) are refused a certificate;
  - PGD in the file's own channels, projected to the stated radius, on a gallery where the bound is tight
    (the `pixels` encoder on small dark images): it never changes the certified top-k, while the same
    attack breaks the first landing's (RGB-only) radius for every mode whose factor exceeds 1;
  - float slack: an encoder whose float error exceeds the old fixed slack still gets sound radii.
"""
from __future__ import annotations

import io
import itertools
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from encoder.certify import DEFAULT_SLACK, certify_topk, slack_for
from encoder.image import (LAYOUT_CHANNELS, channel_lipschitz, decode_bytes, pixels, to_rgb)
from encoder.pixels import PixelsEncoder
from encoder.preprocess import input_norm, resize_operator_norm, samples_to_input
from encoder.protocol import TorchEncoder
from _index_fixtures import png_bytes
from _pgd import pgd_l2

INSIDE = 1 - 1e-4


# Channel factors ------------------------------------------------------------------------------------
def _pixel_jacobian_norm(layout: str, point: np.ndarray) -> float:
    """σ_max of the Jacobian of φ (one pixel) at `point`, by autograd in float64."""
    x = torch.tensor(point, dtype=torch.float64).view(-1, 1, 1)
    jac = torch.autograd.functional.jacobian(lambda s: to_rgb(s, layout).reshape(-1), x).reshape(3, -1)
    return float(torch.linalg.matrix_norm(jac, ord=2))


@pytest.mark.parametrize("layout", sorted(LAYOUT_CHANNELS))
def test_channel_factor_is_the_largest_jacobian_norm_found_by_an_independent_search(layout):
    c = LAYOUT_CHANNELS[layout]
    rng = np.random.default_rng(0)
    grid = np.linspace(0.02, 0.98, 5)  # interior points: the clamp has no kink there
    points = [np.array(p) for p in itertools.product(grid, repeat=c)]
    points += list(rng.uniform(0.001, 0.999, size=(300, c)))
    points += [np.array(p) for p in itertools.product([1e-6, 1 - 1e-6], repeat=c)]  # near every corner
    found = max(_pixel_jacobian_norm(layout, p) for p in points)
    factor = channel_lipschitz(layout)
    assert found <= factor * (1 + 1e-9)
    assert found >= factor * (1 - 1e-5), (layout, found, factor)  # the bound is attained: not loose
    if layout in ("RGB", "L", "YCbCr"):  # linear conversions: the factor is the matrix's σ_max
        jac = torch.autograd.functional.jacobian(
            lambda s: to_rgb(s, layout).reshape(-1), torch.full((c, 1, 1), 0.5, dtype=torch.float64)).reshape(3, c)
        assert factor == pytest.approx(float(torch.linalg.matrix_norm(jac, ord=2)), rel=1e-9)
    # and no pair of whole images moves more than the factor allows (clamping included)
    x = torch.tensor(rng.uniform(-0.2, 1.2, size=(200, c, 4, 4)))
    y = torch.tensor(rng.uniform(-0.2, 1.2, size=(200, c, 4, 4)))
    ratio = (to_rgb(x, layout) - to_rgb(y, layout)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    assert float(ratio.max()) <= factor * (1 + 1e-9)


# Decoding at the true depth, per mode ---------------------------------------------------------------
def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _decode(data: bytes):
    image, notes, fmt = decode_bytes(data)
    return pixels(image), notes, image


def _rng_u8(shape, seed=0, top=255):
    return np.random.default_rng(seed).integers(0, top + 1, size=shape, dtype=np.uint8)


def test_dark_16bit_pgm_decodes_to_its_true_values_not_to_its_range():
    values = np.full((8, 8), 200, dtype=">u2")  # dark: 200/65535, all samples ≤ 255
    values[0, 0] = 255
    px, notes, image = _decode(b"P5 8 8 65535\n" + values.tobytes())
    assert image.mode == "I" and px.layout == "L" and px.bits == 16 and px.uncertified is None
    np.testing.assert_allclose(px.samples[0], values.astype(np.float64) / 65535, rtol=1e-6)
    # raising one sample from 255 to 256 moves the decoded value by 1/65535, not by a jump of scale
    values[0, 0] = 256
    px2, _, _ = _decode(b"P5 8 8 65535\n" + values.tobytes())
    assert float(np.abs(px2.samples - px.samples).max()) == pytest.approx(1 / 65535, rel=1e-5)


def test_16bit_grayscale_png_keeps_every_bit():
    arr = (np.arange(16 * 16).reshape(16, 16) * 251 % 65536).astype(np.uint16)
    px, _, image = _decode(_save(Image.fromarray(arr), "PNG"))
    assert image.mode.startswith("I;16") and (px.layout, px.bits, px.uncertified) == ("L", 16, None)
    np.testing.assert_allclose(px.samples[0], arr / 65535, rtol=1e-6)


@pytest.mark.parametrize("planes,color_type,layout", [(3, 2, "RGB"), (4, 6, "RGBA"), (2, 4, "LA")])
def test_16bit_colour_png_is_decoded_at_its_real_depth(planes, color_type, layout):
    h, w = 9, 11
    arr = np.random.default_rng(planes).integers(0, 65536, size=(h, w, planes)).astype(np.uint16)
    raw = b"".join(b"\x00" + arr[i].astype(">u2").tobytes() for i in range(h))
    px, notes, image = _decode(png_bytes(w, h, 16, color_type, raw))
    assert (px.layout, px.bits, px.uncertified) == (layout, 16, None)
    np.testing.assert_allclose(px.samples, arr.transpose(2, 0, 1) / 65535, rtol=1e-6)
    assert "16-bit samples scaled to [0, 1]" in notes
    # a change of one 16-bit step changes the samples by 1/65535, never by 1/255
    arr2 = arr.copy()
    arr2[0, 0, 0] = arr2[0, 0, 0] ^ 1
    raw2 = b"".join(b"\x00" + arr2[i].astype(">u2").tobytes() for i in range(h))
    px2, _, _ = _decode(png_bytes(w, h, 16, color_type, raw2))
    assert float(np.abs(px2.samples - px.samples).max()) == pytest.approx(1 / 65535, rel=1e-4)


def _cmyk_jpeg() -> tuple[bytes, np.ndarray]:
    arr = _rng_u8((16, 16, 4), seed=3)
    data = _save(Image.fromarray(arr, "CMYK"), "TIFF")
    return data, arr


CERTIFIABLE_FILES = {
    # name: (bytes, expected layout, expected bits, expected samples (C, H, W) in [0,1] or None)
    "L": lambda: (_save(Image.fromarray(_rng_u8((12, 10))), "PNG"), "L", 8),
    "1-bit": lambda: (_save(Image.fromarray(_rng_u8((12, 10), top=1) * 255).convert("1"), "PNG"), "L", 1),
    "LA": lambda: (_save(Image.fromarray(_rng_u8((12, 10, 2)), "LA"), "PNG"), "LA", 8),
    "RGBA": lambda: (_save(Image.fromarray(_rng_u8((12, 10, 4)), "RGBA"), "PNG"), "RGBA", 8),
    "CMYK": lambda: (_cmyk_jpeg()[0], "CMYK", 8),
    "RGB": lambda: (_save(Image.fromarray(_rng_u8((12, 10, 3))), "PNG"), "RGB", 8),
    "YCbCr JPEG": lambda: (_save(Image.fromarray(_rng_u8((16, 16, 3))), "JPEG", quality=90), "RGB", 8),
}


@pytest.mark.parametrize("name", sorted(CERTIFIABLE_FILES))
def test_each_certifiable_mode_decodes_to_its_own_samples(name):
    data, layout, bits = CERTIFIABLE_FILES[name]()
    px, notes, image = _decode(data)
    assert (px.layout, px.bits, px.uncertified) == (layout, bits, None)
    raw = np.asarray(image.convert(layout) if layout != image.mode and image.mode != "1" else image, dtype=np.float64)
    if raw.ndim == 2:
        raw = raw[:, :, None]
    np.testing.assert_allclose(px.samples, raw.transpose(2, 0, 1) / (1 if bits == 1 else 255), atol=1e-6)
    assert f"{LAYOUT_CHANNELS[layout]}-channel" in px.describe() and layout in px.describe()
    # the float conversion agrees with Pillow's 8-bit one up to its rounding
    pil_rgb = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA")).convert("RGB") \
        if "A" in image.mode else image.convert("RGB")
    np.testing.assert_allclose(px.rgb().transpose(1, 2, 0) * 255, np.asarray(pil_rgb, dtype=np.float64), atol=1.01)


def test_colour_key_palette_and_reduced_16bit_decodes_are_refused_a_certificate():
    rgb = _rng_u8((12, 10, 3))
    keyed = _save(Image.fromarray(rgb), "PNG", transparency=tuple(int(v) for v in rgb[0, 0]))
    gray_keyed = _save(Image.fromarray(rgb[:, :, 0]), "PNG", transparency=int(rgb[0, 0, 0]))
    palette = _save(Image.fromarray(rgb).quantize(16), "PNG")
    gif = _save(Image.fromarray(rgb).quantize(16), "GIF")
    tiff16 = _save(Image.fromarray(rgb).convert("RGB"), "TIFF")  # 8-bit control: certified
    for data, why in [(keyed, "colour-key"), (gray_keyed, "colour-key"), (palette, "palette"), (gif, "palette")]:
        px, _, _ = _decode(data)
        assert px.uncertified is not None and why in px.uncertified, (why, px.uncertified)
    assert _decode(tiff16)[0].uncertified is None
    # the keyed pixel still decodes to white, as before (the embedding is unchanged)
    px, _, _ = _decode(keyed)
    np.testing.assert_array_equal(px.rgb()[:, 0, 0], np.ones(3))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_the_same_permutation_for_8_and_16_bit_samples(orientation):
    from encoder.image import _TRANSPOSE

    arr = _rng_u8((6, 9, 3), seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    image, _, _ = decode_bytes(_save(Image.fromarray(arr), "JPEG", exif=exif.tobytes(), quality=100))
    px = pixels(image)
    expected_hw = (9, 6) if orientation >= 5 else (6, 9)
    assert px.size == expected_hw
    from PIL import ImageOps

    pil_oriented = np.asarray(ImageOps.exif_transpose(image), dtype=np.float64) / 255
    np.testing.assert_allclose(px.samples.transpose(1, 2, 0), pil_oriented, atol=1e-6)
    if orientation > 1:  # the numpy table used for 16-bit samples does the same permutation
        raw = np.asarray(image)
        np.testing.assert_array_equal(_TRANSPOSE[orientation](raw), np.asarray(ImageOps.exif_transpose(image)))


# Attacks in the file's own channels -----------------------------------------------------------------
def _tight_case(layout: str, seed: int, n_gallery: int = 6, side: int = 8):
    """A dark query in `layout` (where the channel factor is attained or nearly), and a gallery of its
    near-duplicates in the same layout (so that score differences lie along what the file's channels
    can move), embedded by the pixels encoder at 8 px (resize norm 1)."""
    gen = torch.Generator().manual_seed(seed)
    c = LAYOUT_CHANNELS[layout]
    samples = torch.rand(c, side, side, generator=gen) * 0.15  # dark grey / dark colour samples
    if layout in ("LA", "RGBA"):
        samples[-1] = 1 - samples[-1] * 0.1  # nearly opaque: the alpha factor is attained at a = 1
    if layout == "CMYK":
        samples[3] = 1 - samples[3] * 0.2  # mostly key: dark, where the pixels encoder is tight
    enc = PixelsEncoder(side)
    scale = torch.full((c, 1, 1), 0.02)
    if layout == "RGBA":
        scale[:3] = 0.005  # mostly alpha changes: along 1₃ per pixel, where the factor 2 is attained
    gallery = to_rgb((samples + scale * torch.randn(n_gallery, c, side, side, generator=gen)).clamp(0, 1), layout)
    with torch.no_grad():
        g = enc.embed(gallery)
        e_q = enc.embed(samples_to_input(samples[None], layout, side))[0]
    return enc, samples, g, e_q


def _attack_topk(enc, samples, layout, g, top, eps, seed=0, steps=60, restarts=4):
    """Max over the ball of (best outsider score − worst top-k score): > 0 means the top-k set changed."""
    side = enc.input_size
    outside = torch.tensor([j for j in range(g.shape[0]) if j not in set(top.tolist())])

    def objective(x, case):
        s = enc.embed(samples_to_input(x, layout, side)) @ g.T
        return s[:, outside].max(1).values - s[:, top].min(1).values

    best, _ = pgd_l2(objective, samples[None], torch.tensor([eps]), steps=steps, restarts=restarts, seed=seed)
    return float(best[0])


@pytest.mark.parametrize("layout", ["RGB", "L", "LA", "RGBA", "CMYK"])
def test_pgd_in_the_files_own_channels_never_breaks_the_certificate_and_breaks_the_rgb_only_radius(layout):
    k = 2
    broken_rgb_only = []
    for seed in range(2):
        enc, samples, g, e_q = _tight_case(layout, seed)
        cert = certify_topk(e_q.numpy(), g.numpy(), k, enc.lipschitz, slack=slack_for(enc.float_error))
        if cert.set_radius <= 0:
            continue
        side = enc.input_size
        radius = cert.set_radius / input_norm((side, side), side, layout)  # over the file's samples
        top = torch.as_tensor(cert.positions)
        assert _attack_topk(enc, samples, layout, g, top, radius * INSIDE, seed=seed) < 0, (layout, seed)
        # the first landing stated cert.set_radius / ‖R‖₂ (RGB only); a factor c > 1 shows as a break below it
        rgb_only = cert.set_radius / resize_operator_norm((side, side), (side, side))
        broken_rgb_only.append(_attack_topk(enc, samples, layout, g, top, rgb_only * INSIDE, seed=seed) > 0)
    assert broken_rgb_only, "no case had a positive radius"
    if channel_lipschitz(layout) > 1.5:
        assert any(broken_rgb_only), f"{layout}: the RGB-only radius was never broken, so a wrong factor would not show"
    else:
        assert not any(broken_rgb_only)


def test_search_image_states_a_grayscale_radius_over_its_one_channel_and_refuses_a_colour_key(tmp_path):
    from index import Gallery, IngestOptions, build_index
    from retrieval.search import search_image

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 60, size=(16, 16, 3), dtype=np.uint8)).save(folder / f"rgb{i}.png")
    gray = rng.integers(0, 60, size=(16, 16), dtype=np.uint8)
    Image.fromarray(gray).save(folder / "gray.png")
    Image.fromarray(np.stack([gray] * 3, -1)).save(folder / "keyed.png", transparency=(0, 0, 0))
    enc = PixelsEncoder(8)
    build_index(folder, tmp_path / "index", "pixels:8", encoder=enc, options=IngestOptions(workers=1))
    with Gallery.open(tmp_path / "index", encoder=enc) as gal:
        assert gal.meta["encoder"]["float_error"] == pytest.approx(enc.float_error)
        res = search_image(gal, folder / "gray.png", k=2)
        assert res.input_norm == pytest.approx(math.sqrt(3) * resize_operator_norm((16, 16), (8, 8)), rel=1e-9)
        assert "1-channel 8-bit samples (L, 16×16)" in res.radius_space and res.set_radius > 0
        keyed = search_image(gal, folder / "keyed.png", k=2)
        assert keyed.set_radius is None and all(h.radius is None for h in keyed.hits)
        assert any("colour-key" in n for n in keyed.notes)


# Float slack ----------------------------------------------------------------------------------------
class _CoarseFloatPixels(TorchEncoder):
    """The pixels embedding whose float32 path carries a deterministic error of order 1e-3 (as a
    low-precision kernel would); its float64 path is exact, so `measure_float_error` sees the error."""

    def __init__(self, side: int = 2):
        super().__init__()
        self.name, self.input_size, self.dim, self.lipschitz = "coarse-pixels", side, 3 * side * side + 1, 1.0
        self.register_buffer("mix", torch.randn(3 * side * side, self.dim, generator=torch.Generator().manual_seed(1)))

    def _embed(self, x):
        f = torch.cat([x.flatten(1), torch.ones_like(x[:, :1, 0, 0])], dim=1)
        if x.dtype == torch.float32:
            f = f + 1e-3 * torch.sin(1e5 * (x.flatten(1) @ self.mix.to(x.dtype)))
        return f / f.norm(dim=1, keepdim=True)


def test_an_encoder_whose_float_error_exceeds_the_old_fixed_slack_still_gets_sound_radii():
    enc = _CoarseFloatPixels()
    assert enc.float_error > 10 * DEFAULT_SLACK  # the old fixed slack cannot cover this encoder
    gen = torch.Generator().manual_seed(0)
    violated_old = False
    for trial in range(40):
        q = torch.rand(1, 3, 2, 2, generator=gen) * 0.5 + 0.25
        d = torch.randn(2, 3, 2, 2, generator=gen)
        items = (q + 0.3 * d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).clamp(0, 1)
        with torch.no_grad():
            g = enc.embed(items).numpy()
            e_q = enc.embed(q)[0].numpy()
        old = certify_topk(e_q, g, 1, 1.0, slack=DEFAULT_SLACK)
        new = certify_topk(e_q, g, 1, 1.0, slack=slack_for(enc.float_error))
        assert new.set_radius <= old.set_radius
        top = int(old.positions[0])
        # random perturbations inside each radius: the computed top-1 must not change inside `new`
        for radius, is_new in ((old.set_radius, False), (new.set_radius, True)):
            if radius <= 0:
                continue
            delta = torch.randn(300, 3, 2, 2, generator=gen)
            delta = delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * radius * INSIDE \
                * torch.rand(300, 1, 1, 1, generator=gen)
            with torch.no_grad():
                flipped = (enc.embed(q + delta) @ torch.from_numpy(g).T).argmax(1) != top
            if is_new:
                assert not flipped.any(), "the float-aware radius was broken"
            elif flipped.any():
                violated_old = True
    assert violated_old, "the control never broke the old fixed-slack radius: the test would not show a regression"


@pytest.mark.parametrize("fmt,mode,layout,certified", [
    ("PNG", "RGB", "RGB", True), ("PNG", "L", "L", True), ("PNG", "LA", "LA", True), ("PNG", "RGBA", "RGBA", True),
    ("PNG", "1", "L", True), ("PNG", "P", "RGB", False), ("BMP", "RGB", "RGB", True), ("BMP", "L", "L", True),
    ("TIFF", "RGB", "RGB", True), ("TIFF", "L", "L", True), ("TIFF", "CMYK", "CMYK", True),
    ("TIFF", "RGBA", "RGBA", True), ("TIFF", "I;16", "L", True), ("TIFF", "F", "L", True),
    ("WEBP", "RGB", "RGB", True), ("WEBP", "RGBA", "RGBA", True), ("PPM", "RGB", "RGB", True),
    ("PPM", "L", "L", True), ("PPM", "1", "L", True), ("TGA", "RGB", "RGB", True), ("TGA", "L", "L", True),
    ("GIF", "P", "RGB", False), ("JPEG", "RGB", "RGB", True), ("JPEG", "L", "L", True),
    ("JPEG", "CMYK", "CMYK", True), ("ICO", "RGBA", "RGBA", True),
])
def test_every_accepted_format_decodes_to_a_known_layout_and_says_whether_it_is_certified(fmt, mode, layout,
                                                                                          certified):
    """Pillow's mode for each format robret accepts (encoder.image.IMAGE_EXTENSIONS), as `pixels` sees it."""
    rgb = _rng_u8((16, 16, 3), seed=7)
    image = Image.fromarray(rgb).convert(mode) if mode not in ("I;16", "F") else \
        Image.fromarray((rgb[:, :, 0].astype(np.uint16) * 257) if mode == "I;16" else rgb[:, :, 0] / 255.0)
    if mode == "RGBA":  # a real alpha channel (fully opaque images may be stored without one)
        image.putalpha(Image.fromarray(_rng_u8((16, 16), seed=8)))
    kw = {"lossless": True} if fmt == "WEBP" else {}
    px, _, decoded = _decode(_save(image, fmt, **kw))
    assert px.layout == layout, (fmt, mode, decoded.mode)
    assert (px.uncertified is None) == certified, (fmt, mode, decoded.mode, px.uncertified)
    assert px.size == (16, 16) and px.samples.min() >= 0 and px.samples.max() <= 1
    if certified and fmt in ("PNG", "TIFF", "PPM", "WEBP") and mode in ("RGB", "L"):  # lossless: exact samples
        expected = np.asarray(image, dtype=np.float64) / 255
        got = px.samples
        np.testing.assert_allclose(got.transpose(1, 2, 0).squeeze(-1) if got.shape[0] == 1 else got.transpose(1, 2, 0),
                                   expected, atol=1e-6)


# Decode memory ----------------------------------------------------------------------------------------
def test_decode_budget_never_lets_reservations_exceed_it_and_serialises_oversized_images():
    import threading
    import time

    from encoder.image import DecodeBudget

    budget = DecodeBudget(100)
    inside, worst = [0], [0]
    lock = threading.Lock()

    def job(n):
        with budget.reserve(n):
            with lock:
                inside[0] += min(n, 100)
                worst[0] = max(worst[0], inside[0])
            time.sleep(0.01)
            with lock:
                inside[0] -= min(n, 100)

    threads = [threading.Thread(target=job, args=(n,)) for n in (60, 30, 50, 250, 10, 90, 40) * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert worst[0] <= 100 and budget.peak <= 100 and budget.used == 0
    assert worst[0] > 60  # it did let several images decode at once when they fit


_PEAK_OF_DECODE = r"""
import ctypes, io, sys
import numpy as np
from PIL import Image
from encoder.image import decode_bytes, decode_cost
from encoder.preprocess import to_input
ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # as the command-line program (retrieval/cli.py)

def png(side, seed):
    a = np.zeros((side, side, 3), np.uint8); a[seed::7] = 200; a[:, seed::13, 1] = 90
    buf = io.BytesIO(); Image.fromarray(a).save(buf, "PNG"); return buf.getvalue()

def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))

to_input(decode_bytes(png(1200, 1))[0], 32)  # warm up torch's kernels and allocator on a banded image
data = png(4000, 2)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
before = hwm()
to_input(decode_bytes(data)[0], 32)
print(hwm() - before, decode_cost(data))
"""


def test_decode_cost_bounds_the_measured_peak_of_decoding_and_preprocessing_a_large_image():
    """In a fresh process, decoding + preprocessing a 16-megapixel RGB PNG raises the peak RSS by no more
    than `decode_cost` says (Pillow's 4-byte RGB storage + one band), the figure the ingest workers' shared
    DecodeBudget reserves; and well below the two copies of the samples the old path held."""
    import subprocess
    import sys

    from encoder.image import decode_cost

    if not os.path.exists("/proc/self/status"):
        pytest.skip("peak RSS read from /proc")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _PEAK_OF_DECODE], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}, check=True)
    grew, cost = map(int, out.stdout.split())
    n = 4000 * 4000
    assert 4 * n <= cost and grew <= cost, (grew, cost)
    assert grew < 4 * n + 3 * n, grew  # less than Pillow's image plus one copy of its samples (the old path)
    assert decode_cost(b"not an image") == 0


def test_a_large_non_image_file_is_refused_from_its_header_before_its_body_is_read(tmp_path):
    import tracemalloc

    from index.decode import read_bytes
    from encoder.image import DecodeError

    big = tmp_path / "archive.jpg"  # 200 MB, sparse: not an image despite its extension
    with open(big, "wb") as f:
        f.write(b"PK\x03\x04" + bytes(range(256)) * 64)
        f.truncate(200 * 2**20)
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError) as err:
            read_bytes(big, 512 * 2**20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.value.kind == "not_image"
    assert peak < 32 * 2**20, peak  # the first 64 KB were read (and a few MB of plugin imports), not 200 MB
    # a real image still reads whole (TIFF: no magic problem; TGA: no magic number at all)
    for fmt in ("TIFF", "TGA", "PNG"):
        path = tmp_path / f"ok.{fmt.lower()}"
        Image.fromarray(_rng_u8((40, 30, 3))).save(path, format=fmt)
        assert read_bytes(path, 512 * 2**20) == path.read_bytes()


@pytest.mark.parametrize("layout", sorted(LAYOUT_CHANNELS))
def test_to_pil_writes_each_layout_in_its_own_mode_and_pixels_reads_it_back_to_the_nearest_level(layout):
    from encoder.image import to_pil

    x = torch.rand(LAYOUT_CHANNELS[layout], 5, 7, generator=torch.Generator().manual_seed(0))
    im = to_pil(x, layout)
    assert im.mode == layout and im.size == (7, 5)
    back = pixels(im)
    assert back.layout == layout and float(np.abs(back.samples - x.numpy()).max()) <= 0.5 / 255 + 1e-6
