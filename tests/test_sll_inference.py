"""encoder/_sll_inference.py: the CPU inference kernels give the reference outputs (tolerance 1e-5).

The reference is the straightforward computation: each SLL layer's own forward, unfrozen (T⁻¹
recomputed), layer by layer with conv2d / conv_transpose2d.
"""
from __future__ import annotations

import pytest
import torch

from encoder import LipSimEncoder, get_preset
from encoder._sll_inference import conv_trunk_inference, linear_inference
from encoder.layers import PadChannels, SLLConv2d, SLLLinear

TOL = 1e-5


def _layers(n: int, channels: int, inner: int, k: int, seed: int = 0) -> list[SLLConv2d]:
    torch.manual_seed(seed)
    layers = [SLLConv2d(channels, inner, k) for _ in range(n)]
    with torch.no_grad():
        for layer in layers:
            layer.bias.normal_(0, 0.3)  # more active units than the default init gives
    return layers


def _reference(x: torch.Tensor, layers, channels: int) -> torch.Tensor:
    for layer in layers:
        layer.unfreeze()
    with torch.no_grad():
        x = PadChannels(channels)(x)
        for layer in layers:
            x = layer(x)
    for layer in layers:
        layer.freeze()
    return x


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("in_channels", [3, 8])
def test_conv_trunk_matches_layer_by_layer_reference(k, in_channels):
    layers = _layers(3, 8, 5, k)
    x = torch.rand(3, in_channels, 11, 17)  # not square, not a multiple of anything
    ref = _reference(x, layers, 8)
    out = conv_trunk_inference(x, layers)
    assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert (out - ref).abs().max() <= TOL


def test_conv_trunk_workers_restore_threads_and_work_under_inference_mode():
    layers = _layers(2, 8, 4, 3)
    x = torch.rand(5, 3, 9, 9)
    ref = _reference(x, layers, 8)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # several threads and several images: one image per worker thread
    try:
        with torch.inference_mode():
            out = conv_trunk_inference(x, layers)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert (out - ref).abs().max() <= TOL


def test_linear_inference_matches_unfrozen_forward():
    torch.manual_seed(0)
    layer = SLLLinear(40, 16)
    x = torch.randn(4, 40)
    with torch.no_grad():
        ref = layer(x)
        layer.freeze()
        assert (linear_inference(x, layer) - ref).abs().max() <= TOL


def test_kernels_refold_after_an_in_place_weight_change():
    layers = _layers(1, 8, 5, 3)
    for layer in layers:
        layer.freeze()
    with torch.no_grad():
        layers[0].kernel.mul_(1.5)
        layers[0].q.add_(0.3)
    x = torch.rand(2, 8, 7, 7)
    out = conv_trunk_inference(x, layers)  # must not use the stale fold
    assert (out - _reference(x, layers, 8)).abs().max() <= TOL


def test_lipsim_small_at_224_matches_the_unfrozen_reference():
    torch.manual_seed(0)
    enc = LipSimEncoder(get_preset("small")).eval()
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        ref = enc.embed(x)
        enc.freeze()
        fast = enc.embed(x)
    assert (fast - ref).abs().max() <= TOL


def test_fast_path_only_without_gradients(monkeypatch):
    import encoder.lipsim as lipsim

    calls = []
    real = lipsim.conv_trunk_inference
    monkeypatch.setattr(lipsim, "conv_trunk_inference", lambda *a: calls.append(1) or real(*a))
    enc = LipSimEncoder(get_preset("cpu-tiny")).freeze()
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    e = enc.embed(x)  # attacks: the autograd path, gradients reach the input
    e.sum().backward()
    assert not calls and x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        fast = enc.embed(x)
    assert calls == [1] and (fast - e.detach()).abs().max() <= TOL


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("batch", [1, 2])
def test_conv_trunk_splits_images_into_row_blocks_with_more_threads_than_images(k, batch):
    layers = _layers(3, 8, 5, k)
    x = torch.rand(batch, 3, 13, 10)
    ref = _reference(x, layers, 8)
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # 13 rows in 3 blocks, each needing halo rows from its neighbours
    try:
        out = conv_trunk_inference(x, layers)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert (out - ref).abs().max() <= TOL
