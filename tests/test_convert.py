"""Official LipSim checkpoints (encoder/convert.py) and the registry's spec strings.

The reference is an independent re-implementation of the official network (github.com/
SaraGhazanfari/lipsim, lipsim/core/models/l2_lip/{layers,model}.py) with the official module layout,
so that its state_dict has exactly the official keys: `module.model.convs.{i}.kernel|bias|q`,
`module.model.linear.{j}.weight|bias|q` (j from 1: index 0 is a Flatten), duplicated under
`module.model.base.1.*` / `module.model.base.2.*` because `base` holds the same modules again.
A checkpoint is `torch.save({'model_state_dict': …, 'epoch': …, 'optimizer_state_dict': …})`.
Parity tolerance: max |Δ| ≤ 1e-5 on the unit-norm embedding.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from encoder import CheckpointError, EncoderError, LipSimNet, get_preset, load_encoder
from encoder.convert import convert_official_state_dict, load_official
from encoder.presets import PRESETS

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5


# --- independent reference: the official layers and network, as the official code computes them ---

def _official_safe_inv(x):
    mask = x == 0
    x_inv = x ** (-1)
    x_inv[mask] = 0
    return x_inv


class _OfficialConv(nn.Module):  # SDPBasedLipschitzConvLayer
    def __init__(self, cin, inner_dim, kernel_size=3):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(inner_dim, cin, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(1, inner_dim, 1, 1))
        self.q = nn.Parameter(torch.randn(inner_dim))
        nn.init.xavier_normal_(self.kernel)
        bound = 1 / math.sqrt(cin * kernel_size**2)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x):
        ktk = F.conv2d(self.kernel, self.kernel, padding=self.kernel.shape[-1] - 1).abs()
        q = torch.exp(self.q).reshape(-1, 1, 1, 1)
        q_inv = torch.exp(-self.q).reshape(-1, 1, 1, 1)
        t = _official_safe_inv((q_inv * ktk * q).sum((1, 2, 3))).reshape(1, -1, 1, 1)
        res = t * F.relu(F.conv2d(x, self.kernel, padding=1) + self.bias)
        return x - 2 * F.conv_transpose2d(res, self.kernel, padding=1)


class _OfficialLinear(nn.Module):  # SDPBasedLipschitzLinearLayer
    def __init__(self, cin, inner_dim):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(inner_dim, cin))
        self.bias = nn.Parameter(torch.empty(1, inner_dim))
        self.q = nn.Parameter(torch.randn(inner_dim))
        nn.init.xavier_normal_(self.weight)
        nn.init.uniform_(self.bias, -1 / math.sqrt(cin), 1 / math.sqrt(cin))

    def forward(self, x):
        q, q_inv = torch.exp(self.q), torch.exp(-self.q)
        t = torch.abs(torch.einsum("i,ik,kj,j -> ij", q_inv, self.weight, self.weight.T, q)).sum(1)
        res = _official_safe_inv(t) * F.relu(F.linear(x, self.weight) + self.bias)
        return x - 2 * F.linear(res, self.weight.T)


class _PaddingChannels(nn.Module):
    def __init__(self, ncout, ncin=3):
        super().__init__()
        self.ncout, self.ncin = ncout, ncin

    def forward(self, x):
        out = torch.zeros(x.shape[0], self.ncout, *x.shape[2:], device=x.device)
        out[:, : self.ncin] = x
        return out


class _L2LipschitzNetwork(nn.Module):
    def __init__(self, depth, num_channels, depth_linear, n_features, conv_size, n_classes, side):
        super().__init__()
        self.conv1 = _PaddingChannels(num_channels, 3)
        layers = [_OfficialConv(num_channels, conv_size) for _ in range(depth)]
        layers += [nn.AvgPool2d(4, divisor_override=4), nn.AvgPool2d(4, divisor_override=4)]
        self.convs = nn.Sequential(*layers)
        in_channels = num_channels * side * side
        self.linear = nn.Sequential(nn.Flatten(), *[_OfficialLinear(in_channels, n_features)
                                                    for _ in range(depth_linear)])
        self.base = nn.Sequential(self.conv1, self.convs, self.linear)
        self.n_classes = n_classes

    def forward(self, x):
        return self.base(x)[:, : self.n_classes]  # PoolingLinear(agg="trunc")


class _NormalizedModel(nn.Module):  # mean 0, std 1 in the official evaluator: no buffers
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


class _DataParallelLike(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


def _official(depth, channels, depth_linear, n_features, n_classes, input_size, conv_size=5, seed=0):
    torch.manual_seed(seed)
    net = _L2LipschitzNetwork(depth, channels, depth_linear, n_features, conv_size, n_classes, input_size // 16)
    return _DataParallelLike(_NormalizedModel(net)).eval()


def _reference_embedding(official, x):
    with torch.no_grad():
        out = official(x)
    f = torch.cat([out, torch.ones_like(out[:, :1])], 1)
    return f / f.norm(dim=1, keepdim=True)


def _save_official(official, path, input_size=None):
    """torch.save in the official trainer's format; with input_size, after one Adam step so that the
    file also carries an optimizer state full of tensors, as real training checkpoints do."""
    ckpt = {"model_state_dict": official.state_dict()}
    if input_size is not None:
        opt = torch.optim.Adam(official.parameters(), lr=1e-3)
        official(torch.rand(1, 3, input_size, input_size)).sum().backward()
        opt.step()
        ckpt = {"model_state_dict": official.state_dict(), "epoch": 7, "global_step": 1234,
                "optimizer_state_dict": opt.state_dict()}
    torch.save(ckpt, path)


def test_reference_state_dict_has_exactly_the_official_keys():
    official = _official(depth=2, channels=6, depth_linear=2, n_features=16, n_classes=8, input_size=32)
    keys = set(official.state_dict())
    expected = set()
    for i in range(2):
        for name in ("kernel", "bias", "q"):
            expected |= {f"module.model.convs.{i}.{name}", f"module.model.base.1.{i}.{name}"}
    for j in (1, 2):
        for name in ("weight", "bias", "q"):
            expected |= {f"module.model.linear.{j}.{name}", f"module.model.base.2.{j}.{name}"}
    assert keys == expected
    sd = official.state_dict()
    assert sd["module.model.convs.0.kernel"].shape == (5, 6, 3, 3)
    assert sd["module.model.convs.0.bias"].shape == (1, 5, 1, 1)
    assert sd["module.model.linear.1.weight"].shape == (16, 24) and sd["module.model.linear.1.bias"].shape == (1, 16)


@pytest.mark.parametrize("input_size,channels,embed_dim", [(32, 8, 20), (64, 6, 50)])
def test_official_checkpoint_converts_to_the_same_function(tmp_path, input_size, channels, embed_dim):
    official = _official(depth=3, channels=channels, depth_linear=2, n_features=24, n_classes=embed_dim,
                         input_size=input_size)
    path = tmp_path / "official.pth"
    _save_official(official, path, input_size)
    enc = load_official(path, embed_dim=embed_dim)
    assert enc.input_size == input_size and enc.dim == embed_dim + 1 and enc.lipschitz == 1.0
    assert enc.config.conv_depth == 3 and enc.config.linear_depth == 2 and enc.config.conv_inner == 5
    x = torch.rand(4, 3, input_size, input_size)
    ref = _reference_embedding(official, x)
    out = enc.embed(x)
    assert (out - ref).abs().max().item() <= TOL
    with torch.no_grad():
        raw = official(x)
    assert (enc.net.features(x)[:, :-1] - raw).abs().max().item() <= TOL * raw.abs().max().item()
    # the conv q's of the official file were random, but they cancel there and are zero here
    assert all(layer.q.abs().max() == 0 for layer in enc.net.convs)
    assert official.state_dict()["module.model.convs.0.q"].abs().max() > 0


def test_registry_loads_an_official_pth(tmp_path):
    # D = 1792 (the default) needs ≥ 1792 features: 10 channels at 224 px (14·14·10 = 1960).
    official = _official(depth=1, channels=10, depth_linear=1, n_features=16, n_classes=1792, input_size=224)
    path = tmp_path / "lipsim_official.pth"
    _save_official(official, path)
    enc = load_encoder(f"lipsim:{path}")
    assert enc.dim == 1793 and enc.input_size == 224 and enc.info()["preset"] == "custom"
    assert "official" in enc.info()["weights"]
    x = torch.rand(1, 3, 224, 224)
    assert (enc.embed(x) - _reference_embedding(official, x)).abs().max().item() <= TOL


def test_small_preset_accepts_the_official_shapes_and_has_63_3m_parameters():
    cfg = get_preset("small")
    official = _official(depth=cfg.conv_depth, channels=cfg.channels, depth_linear=cfg.linear_depth,
                         n_features=cfg.linear_inner, n_classes=1792, input_size=224)
    state = official.state_dict()
    assert state["module.model.convs.0.kernel"].shape == (5, 45, 3, 3)
    assert state["module.model.linear.1.weight"].shape == (1024, 8820)
    config, converted = convert_official_state_dict(state)
    assert config == PRESETS["small"]
    assert config.num_params() == 63_276_796 and round(config.num_params() / 1e6, 1) == 63.3
    net = LipSimNet(config).eval()
    net.load_state_dict(converted)  # strict
    assert sum(p.numel() for p in net.parameters()) == 63_276_796
    # Parity with every official-shaped weight, stage by stage (a whole 224 px forward of the
    # reference costs ~10 s here; the conv layers work at any size, the dense ones on any vector):
    model = official.module.model
    x = torch.rand(2, 45, 32, 32)
    with torch.no_grad():
        ours, ref = x, x
        for layer, off in zip(net.convs, list(model.convs)[: cfg.conv_depth]):
            ours, ref = layer(ours), off(ref)
        assert (ours - ref).abs().max().item() <= TOL * ref.abs().max().item()
        v = torch.randn(2, 8820)
        ours, ref = v, v
        # two of the seven dense layers: each costs two 1024×8820 Gram products (the rest are alike)
        for layer, off in zip(list(net.linear)[:2], list(model.linear)[1:3]):
            ours, ref = layer(ours), off(ref)
        assert (ours - ref).abs().max().item() <= TOL * ref.abs().max().item()


def _state(depth=2, channels=6):
    return _official(depth=depth, channels=channels, depth_linear=1, n_features=8, n_classes=8,
                     input_size=32).state_dict()


def test_truncated_pth_is_a_clear_checkpoint_error(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save({"model_state_dict": _state()}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a loadable PyTorch checkpoint"):
        load_official(path, embed_dim=8)


def test_non_lipsim_pth_is_a_clear_checkpoint_error(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"model_state_dict": {"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.bias": torch.zeros(10)}}, path)
    with pytest.raises(CheckpointError, match="not an official LipSim checkpoint"):
        load_official(path)
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_official(path)


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "module.pth"
    torch.save(nn.Linear(2, 2), path)  # a whole module: unpickling it would run code
    with pytest.raises(CheckpointError, match="weights_only"):
        load_official(path)


def test_inconsistent_duplicates_and_incomplete_layers_are_refused():
    state = _state()
    state["module.model.base.1.0.kernel"] = state["module.model.base.1.0.kernel"] + 1
    with pytest.raises(CheckpointError, match="does not match its primary copy"):
        convert_official_state_dict(state, embed_dim=8)
    state = _state()
    del state["module.model.linear.1.q"], state["module.model.base.2.1.q"]
    with pytest.raises(CheckpointError, match="has tensors"):
        convert_official_state_dict(state, embed_dim=8)
    state = _state()
    state["module.model.head.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="unexpected keys"):
        convert_official_state_dict(state, embed_dim=8)
    state = _state()
    state["module.model.convs.1.kernel"] = torch.zeros(5, 7, 3, 3)
    state["module.model.base.1.1.kernel"] = state["module.model.convs.1.kernel"]
    with pytest.raises(CheckpointError, match="shape"):
        convert_official_state_dict(state, embed_dim=8)
    with pytest.raises(CheckpointError, match="unsupported shape"):
        convert_official_state_dict(_state(), embed_dim=1792)  # D larger than the 24 features


def test_alpha_keys_are_dropped_as_the_official_loader_does():
    state = _state()
    state["module.model.convs.0.alpha"] = torch.ones(1)
    config, converted = convert_official_state_dict(state, embed_dim=8)
    assert not any("alpha" in k for k in converted)


def test_prefix_variants_and_normalisation_are_converted():
    state = {k.replace("module.model.", "model."): v for k, v in _state().items()}
    config, converted = convert_official_state_dict(state, embed_dim=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.5))
    assert config.lipschitz == 4.0 and torch.equal(converted["std"].flatten(), torch.tensor([0.5, 0.25, 0.5]))
    LipSimNet(config).load_state_dict(converted)


def test_unknown_specs_raise_value_errors_that_list_what_exists(tmp_path):
    with pytest.raises(ValueError, match=r"known backends: .*lipsim.*pixels"):
        load_encoder("nosuch:thing")
    with pytest.raises(ValueError, match=r"cpu-tiny.*|.*small"):
        load_encoder("lipsim:no-such-model")
    with pytest.raises(ValueError, match="preset"):
        load_encoder("lipsim")
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(EncoderError, match="unknown checkpoint type"):
        load_encoder(f"lipsim:{other}")
    pixels = load_encoder("pixels")
    assert pixels.lipschitz == 1.0 and pixels.dim == 3 * 32 * 32 + 1
    x = torch.rand(2, 3, 32, 32)
    np.testing.assert_allclose(pixels.embed(x).norm(dim=1).numpy(), 1, rtol=1e-6)
