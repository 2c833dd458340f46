"""Preprocessing (encoder/preprocess.py): the resize is the linear map whose norm the certificates use.

* resize_matrix reproduces F.interpolate (antialiased bilinear) on random non-square images, up and down;
* resize_operator_norm equals the norm of the real resize found by power iteration (which can only
  fall below it), and is attained;
* EXIF orientation is applied; every common PIL mode becomes a float (3, H, W) tensor in [0, 1].
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from encoder.preprocess import pil_to_tensor, resize, resize_matrix, resize_operator_norm, to_input

pytestmark = pytest.mark.usefixtures("one_thread")

sizes = st.integers(1, 97)


def _interp64(x, out_hw):
    return F.interpolate(x, size=out_hw, mode="bilinear", antialias=True, align_corners=False)


@settings(max_examples=40, deadline=None)
@given(h=sizes, w=sizes, oh=st.integers(2, 70), ow=st.integers(2, 70), seed=st.integers(0, 2**31))
def test_resize_matrix_reproduces_interpolate_on_random_non_square_images(h, w, oh, ow, seed):
    # (Outputs one pixel wide are left out: torch's antialiased kernel gets them wrong, and no
    # encoder input is that narrow. resize_matrix itself never asks torch for one; see below.)
    x = torch.rand(1, 2, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    ref = _interp64(x, (oh, ow))[0].numpy()
    mh, mw = resize_matrix(h, oh), resize_matrix(w, ow)
    assert mh.shape == (oh, h) and mw.shape == (ow, w)
    np.testing.assert_allclose(np.einsum("ij,cjk,lk->cil", mh, x[0].numpy(), mw), ref, atol=1e-12)
    # `resize` (float32, what preprocessing runs) is the same map up to float32 rounding
    # (its weights are float32-rounded: a relative error up to ~1e-5, covered by the norm's margin)
    np.testing.assert_allclose(resize(x.float(), (oh, ow))[0].numpy(), ref, atol=1e-5)


@pytest.mark.parametrize("n_in", [513, 1025, 1537])
def test_resize_matrix_is_right_when_the_last_chunk_is_one_column_wide(n_in):
    x = torch.rand(1, 1, n_in, 3, dtype=torch.float64)
    np.testing.assert_allclose(resize_matrix(n_in, 64) @ x[0, 0].numpy(), _interp64(x, (64, 3))[0, 0].numpy(),
                               atol=1e-12)


def _power_iteration_resize_norm(in_hw, out_hw, iters=300, seed=0):
    v = torch.randn(1, 1, *in_hw, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    sigma = 0.0
    for _ in range(iters):
        v = v / v.norm()
        v.requires_grad_(True)
        out = _interp64(v, out_hw)
        sigma = out.norm().item()
        (grad,) = torch.autograd.grad(0.5 * out.square().sum(), v)  # Rᵀ R v
        v = grad.detach()
    return sigma


def _lanczos_resize_norm(in_hw, out_hw):
    """σ_max of the real 2-D resize by ARPACK (Lanczos on RᵀR), R and Rᵀ applied through torch."""
    from scipy.sparse.linalg import LinearOperator, svds

    n_in, n_out = in_hw[0] * in_hw[1], out_hw[0] * out_hw[1]

    def matvec(v):
        x = torch.as_tensor(np.asarray(v, dtype=np.float64)).view(1, 1, *in_hw)
        return _interp64(x, out_hw).reshape(-1).numpy()

    def rmatvec(u):
        v = torch.zeros(1, 1, *in_hw, dtype=torch.float64, requires_grad=True)
        out = _interp64(v, out_hw)
        (g,) = torch.autograd.grad(out, v, torch.as_tensor(np.asarray(u, dtype=np.float64)).view(out.shape))
        return g.reshape(-1).numpy()

    op = LinearOperator((n_out, n_in), matvec=matvec, rmatvec=rmatvec, dtype=np.float64)
    return float(svds(op, k=1, return_singular_vectors=False, tol=1e-12, random_state=0)[0])


@pytest.mark.parametrize("in_hw,out_hw", [((57, 45), (32, 32)), ((20, 25), (32, 32)), ((150, 41), (64, 64)),
                                          ((33, 90), (64, 64)), ((7, 3), (32, 32)), ((513, 5), (32, 32))])
def test_resize_operator_norm_equals_power_iteration_on_the_real_resize(in_hw, out_hw):
    exact = resize_operator_norm(in_hw, out_hw)
    # Power iteration on the real resize is a lower bound that creeps up slowly (the top of a
    # resize's spectrum is crowded); Lanczos on the same operator converges to it.
    pi = _power_iteration_resize_norm(in_hw, out_hw, iters=400)
    assert pi <= exact  # the certified norm is rounded up, never below the truth
    assert pi == pytest.approx(exact, rel=3e-3)
    lanczos = _lanczos_resize_norm(in_hw, out_hw)
    assert lanczos <= exact and lanczos == pytest.approx(exact, rel=2e-5)
    # the float32 resize that preprocessing runs is a slightly different linear map: still below
    rows = torch.eye(in_hw[0], dtype=torch.float32)[None, None]
    cols = torch.eye(in_hw[1], dtype=torch.float32)[None, None]
    m_h = F.interpolate(rows, size=(out_hw[0], in_hw[0]), mode="bilinear", antialias=True, align_corners=False)
    m_w = F.interpolate(cols, size=(out_hw[1], in_hw[1]), mode="bilinear", antialias=True, align_corners=False)
    assert np.linalg.norm(m_h[0, 0].double().numpy(), 2) * np.linalg.norm(m_w[0, 0].double().numpy(), 2) <= exact
    # attained: the top singular vectors of the two 1-D factors give an image that stretches by it
    _, _, vh = np.linalg.svd(resize_matrix(in_hw[0], out_hw[0]))
    _, _, vw = np.linalg.svd(resize_matrix(in_hw[1], out_hw[1]))
    img = torch.as_tensor(np.outer(vh[0], vw[0]))[None, None]
    assert _interp64(img, out_hw).norm().item() == pytest.approx(exact, rel=2e-5)


def test_resize_norm_identity_and_downsizing_shrinks():
    assert resize_operator_norm((32, 32), (32, 32)) == 1.0
    assert resize_operator_norm((128, 128), (32, 32)) < 1  # antialiased averaging contracts
    assert resize_operator_norm((8, 8), (32, 32)) > 1  # upsampling repeats pixels: radii shrink


def _exif_png(image: Image.Image, orientation: int, fmt: str = "PNG") -> Image.Image:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, fmt, exif=exif.tobytes())
    buf.seek(0)
    return Image.open(buf)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_is_applied(fmt):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 20))  # the left quarter is blue
    t = pil_to_tensor(_exif_png(image, 6, fmt))  # 6: rotate 90° clockwise to display
    assert t.shape == (3, 40, 20)
    assert t[2, :8].mean() > 0.9 and t[0, :8].mean() < 0.1  # the blue quarter is now on top
    assert t[0, -8:].mean() > 0.9
    t3 = pil_to_tensor(_exif_png(image, 3, fmt))  # 3: rotate 180°
    assert t3.shape == (3, 20, 40) and t3[2, :, -8:].mean() > 0.9
    plain = pil_to_tensor(_exif_png(image, 1, fmt))
    assert plain.shape == (3, 20, 40) and plain[2, :, :8].mean() > 0.9


def _with_transparent_pixel_p():
    im = Image.new("P", (4, 3), 1)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.info["transparency"] = 0  # palette index 0 is transparent
    return im


@pytest.mark.parametrize("make,expected", [
    (lambda: Image.new("L", (4, 3), 128), (128 / 255,) * 3),
    (lambda: Image.new("1", (4, 3), 1), (1.0, 1.0, 1.0)),
    (lambda: Image.new("LA", (4, 3), (50, 0)), (1.0, 1.0, 1.0)),  # fully transparent: white
    (lambda: Image.new("LA", (4, 3), (0, 255)), (0.0, 0.0, 0.0)),
    (lambda: Image.new("RGBA", (4, 3), (255, 0, 0, 0)), (1.0, 1.0, 1.0)),
    (lambda: Image.new("RGBA", (4, 3), (255, 0, 0, 255)), (1.0, 0.0, 0.0)),
    (lambda: Image.new("RGBA", (4, 3), (0, 0, 0, 128)), (127 / 255,) * 3),  # half over white
    (lambda: Image.new("CMYK", (4, 3), (0, 0, 0, 0)), (1.0, 1.0, 1.0)),
    (lambda: Image.new("CMYK", (4, 3), (0, 255, 255, 0)), (1.0, 0.0, 0.0)),
    (lambda: Image.new("I;16", (4, 3), 65535), (1.0, 1.0, 1.0)),
    (lambda: Image.new("I;16", (4, 3), 0), (0.0, 0.0, 0.0)),
    (lambda: Image.new("RGB", (4, 3), (10, 20, 30)), (10 / 255, 20 / 255, 30 / 255)),
])
def test_modes_convert_to_three_channel_floats_in_unit_range(make, expected):
    t = pil_to_tensor(make())
    assert t.shape == (3, 3, 4) and t.dtype == torch.float32
    assert 0 <= t.min() and t.max() <= 1
    torch.testing.assert_close(t[:, 1, 1], torch.tensor(expected, dtype=torch.float32), atol=1 / 255, rtol=0)


def test_palette_transparency_becomes_white():
    t = pil_to_tensor(_with_transparent_pixel_p())
    assert t.shape == (3, 3, 4)
    torch.testing.assert_close(t[:, 0, 0], torch.ones(3))  # transparent index over white
    torch.testing.assert_close(t[:, 1, 1], torch.tensor([1.0, 0.0, 0.0]))


def test_sixteen_bit_png_round_trip(tmp_path):
    arr = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    path = tmp_path / "g16.png"
    Image.fromarray(arr).save(path)
    with Image.open(path) as im:
        t = pil_to_tensor(im)
    torch.testing.assert_close(t[0], torch.as_tensor(arr / 65535.0, dtype=torch.float32))


def test_to_input_shape_range_and_linearity():
    image = Image.new("RGB", (50, 37), (200, 100, 0))
    x = to_input(image, 32)
    assert x.shape == (1, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    torch.testing.assert_close(x[0, :, 5, 5], torch.tensor([200 / 255, 100 / 255, 0.0]))
    a, b = torch.rand(3, 20, 30), torch.rand(3, 20, 30)
    torch.testing.assert_close(resize(a + 2 * b, 32), resize(a, 32) + 2 * resize(b, 32), atol=1e-5, rtol=0)


def test_encoder_input_norm_is_the_resize_norm(tiny_lipsim):
    assert tiny_lipsim.input_norm((57, 45)) == resize_operator_norm((57, 45), (32, 32))
    assert tiny_lipsim.input_norm((32, 32)) == 1.0


# Samples read from the decoder's image band by band -------------------------------------------------
def _mode_image(mode: str, size=(37, 23), seed=0) -> Image.Image:
    bands = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4, "YCbCr": 3}[mode]
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], bands), dtype=np.uint8)
    return Image.frombytes(mode, size, arr.tobytes())


def _whole_image_input(image: Image.Image, size: int, dtype=torch.float32) -> torch.Tensor:
    """The reference map, computed independently of encoder.image's band reader and of encoder.resize's
    matrices: Pillow's own EXIF transpose of the whole image, all samples / 255 as one float64 array, the
    float channel conversion, then one resize of the whole image by torch's kernel (in `dtype`)."""
    from PIL import ImageOps

    from encoder.image import to_rgb

    arr = np.asarray(ImageOps.exif_transpose(image), dtype=np.float64) / 255
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    samples = torch.as_tensor(arr).permute(2, 0, 1).to(dtype)
    return resize(to_rgb(samples, image.mode), size)[None]


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "CMYK", "YCbCr"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_banded_input_straight_from_the_decoder_equals_the_whole_image_input(mode, orientation, monkeypatch):
    """The streamed path (samples read from the decoder's image in bands of rows, EXIF orientation applied
    per band, each band converted and resized along its width as a product with the resize matrix) is the
    same certified map as converting and resizing the whole oriented image at once with torch's kernel:
    its integer samples are identical bit for bit, and the model input agrees with torch's float64 resize to
    5e-7 (float32 products) and with its float32 resize to 1e-5 (whose own float32 weights err by ~4e-6)."""
    import encoder.resize as rs
    from PIL import ImageOps

    from encoder.image import pixels

    image = _mode_image(mode, seed=orientation)
    if orientation > 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.info["exif"] = exif.tobytes()
        image.getexif()[0x0112] = orientation
    px = pixels(image)
    assert px.raw is None and px.image is image  # no copy of the samples was made
    oriented = np.asarray(ImageOps.exif_transpose(image))
    oriented = oriented[:, :, None] if oriented.ndim == 2 else oriented
    assert px.size == oriented.shape[:2]
    for r0, r1 in ((0, px.size[0]), (0, 1), (3, 10), (px.size[0] - 4, px.size[0])):
        np.testing.assert_array_equal(px.raw_rows(r0, r1).transpose(1, 2, 0), oriented[r0:r1])
    exact = _whole_image_input(image, 16, torch.float64)
    monkeypatch.setattr(rs, "BAND_PIXELS", 5 * max(px.size))  # bands of 5 rows (or columns)
    banded = to_input(image, 16)
    assert banded.shape == (1, 3, 16, 16) and banded.dtype == torch.float32
    torch.testing.assert_close(banded.double(), exact, atol=5e-7, rtol=0)
    torch.testing.assert_close(banded, _whole_image_input(image, 16), atol=1e-5, rtol=0)
    monkeypatch.setattr(rs, "BAND_PIXELS", 1 << 22)  # the whole image in one band
    np.testing.assert_allclose(rs.reduce_to_input(image, 16)[None], banded.numpy(), atol=5e-7, rtol=0)


def test_preprocessing_a_large_image_never_copies_its_samples_whole(monkeypatch):
    """A 2000×2000 RGB image (12 MB of 8-bit samples, 48 MB as floats) is preprocessed holding one band of
    its samples at a time: numpy's allocations (the band copies and the (3, H, 32) intermediate, traced by
    tracemalloc) stay far below one copy of the image."""
    import tracemalloc

    import encoder.resize as rs

    image = _mode_image("RGB", size=(2000, 2000))
    monkeypatch.setattr(rs, "BAND_PIXELS", 1 << 16)  # bands of 32 rows
    to_input(image, 32)  # the resize matrices, computed once per size pair and cached, are not the question
    tracemalloc.start()
    try:
        to_input(image, 32)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3_000_000, f"{peak} bytes traced: a whole copy of the 12 MB samples was made"
