"""Whole-network Lipschitz audit of LipSim (encoder/lipsim.py) and its inference (frozen) form.

For each audited shape (every cpu-* preset, an official-width network at reduced depth and input,
and a normalised one whose bound is 1/min(std)), on the embedding e and on the trunk before the
truncation (the stack of 1-Lipschitz layers, where the bound is nearly attained):
  * the Jacobian spectral norm at random inputs and at adversarially chosen inputs, by power
    iteration (jvp/vjp) and, where the output is small, exactly from the full Jacobian;
  * ‖f(x) − f(y)‖ / ‖x − y‖ over random pairs and over pairs found by gradient ascent on the ratio.
Everything must stay ≤ L·(1 + 1e-4). The maxima are shown in pytest's terminal summary.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from _audit import TOL, exact_jacobian_norm, hill_climb_jacobian, max_ratio_search, power_iteration_norm
from _report import note_max
from encoder import Encoder, LipSimEncoder, LipSimNet, get_preset, load_encoder, load_metric
from encoder.presets import LipSimConfig

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:FutureWarning")]

# Official widths (45 channels, conv inner 5, dense inner 1024) at reduced depth and a 32 px input.
OFFICIAL_REDUCED = dataclasses.replace(get_preset("small"), input_size=32, conv_depth=3, linear_depth=2,
                                       embed_dim=128)
# Normalised: L = 1/min(std) = 1/0.224.
NORMALISED = dataclasses.replace(get_preset("cpu-tiny"), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
# Space-to-depth by 2 before the trunk (as the shipped lipsim:demo): 12 input channels at half the side.
UNSHUFFLED = LipSimConfig(input_size=32, channels=12, conv_depth=3, conv_inner=8, linear_depth=2, linear_inner=64,
                          embed_dim=32, unshuffle=2, pools=2, pool_size=2)


def _note(key: str, value) -> None:
    note_max("LipSim model audit: largest norm and ratio found (bound L)", key, value)


def _trunk(net: LipSimNet, x: torch.Tensor) -> torch.Tensor:
    """Output of the last dense layer before truncation (all features, no constant coordinate)."""
    if net.mean is not None:
        x = (x - net.mean) / net.std
    if net.config.unshuffle > 1:
        x = torch.nn.functional.pixel_unshuffle(x, net.config.unshuffle)
    x = net.pad(x)
    for layer in net.convs:
        x = layer(x)
    for _ in range(net.config.pools):
        x = net.pool(x)
    x = x.flatten(1)
    for layer in net.linear:
        x = layer(x)
    return x


def _net(config: LipSimConfig, seed: int = 0, frozen: bool = True) -> LipSimNet:
    torch.manual_seed(seed)
    net = LipSimNet(config)
    return net.freeze() if frozen else net.eval()


def _special_inputs(s: int) -> torch.Tensor:
    """Inputs chosen to stress the bound: black (‖f‖ smallest, so e's Jacobian largest), white, a
    checkerboard (high frequencies that sum-pooling cannot average away), a single bright pixel."""
    checker = (torch.arange(s)[:, None] + torch.arange(s)[None, :]) % 2
    pixel = torch.zeros(3, s, s)
    pixel[:, s // 2, s // 2] = 1
    return torch.stack([torch.zeros(3, s, s), torch.ones(3, s, s), checker.expand(3, s, s).float(), pixel])


def _audit(name: str, config: LipSimConfig, exact: bool, pi_iters: int, ratio_steps: int, n_random: int):
    net = _net(config)
    lip = config.lipschitz
    s = config.input_size
    gen = torch.Generator().manual_seed(1)
    x_rand = torch.rand(n_random, 3, s, s, generator=gen)
    x_dark = x_rand * 0.03  # dark images: ‖f‖ close to 1, e's Jacobian close to its bound
    with torch.no_grad():
        torch.testing.assert_close(_trunk(net, x_rand)[:, : config.embed_dim], net.features(x_rand)[:, :-1])

    # Pairs maximising the ratio (for e: start dark; for the trunk: start anywhere).
    y0 = (x_rand + 0.05 * torch.randn(x_rand.shape, generator=gen)).clamp(0, 1)
    r_e, xe, ye = max_ratio_search(net, x_dark, (y0 * 0.03).clamp(0, 1), steps=ratio_steps, lr=0.01)
    r_t, xt, yt = max_ratio_search(lambda z: _trunk(net, z), x_rand, y0, steps=ratio_steps, lr=0.02)
    with torch.no_grad():  # plain random pairs too
        a, b = torch.rand(2, 16, 3, s, s, generator=gen)
        r_rand = (net(a) - net(b)).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
    _note(f"{name}: e ratio, random pairs", r_rand.max())
    _note(f"{name}: e ratio, ascent", r_e.max())
    _note(f"{name}: trunk ratio, ascent", r_t.max())
    assert r_rand.max() <= lip * (1 + TOL)
    assert r_e.max() <= lip * (1 + TOL)
    assert r_t.max() <= lip * (1 + TOL)

    # Jacobians at random, special and ascent-chosen inputs (the ascent's end points are where the
    # function stretched most). e stretches most where ‖f‖ is small (dark images), the trunk anywhere.
    special = _special_inputs(s)
    inputs_e = torch.cat([x_dark[:2], special[:1], xe[:2]])
    inputs_t = torch.cat([x_rand[:1], special[1:], xt[:2]])
    jn_e = power_iteration_norm(net, inputs_e, iters=pi_iters)
    jn_t = power_iteration_norm(lambda z: _trunk(net, z), inputs_t, iters=pi_iters)
    _note(f"{name}: e Jacobian, power iteration", jn_e.max())
    _note(f"{name}: trunk Jacobian, power iteration", jn_t.max())
    assert jn_e.max() <= lip * (1 + TOL) and jn_t.max() <= lip * (1 + TOL)
    if exact:
        ex = exact_jacobian_norm(net, torch.cat([inputs_e, inputs_t, x_rand[1:3]]))
        _note(f"{name}: e Jacobian, exact", ex.max())
        assert ex.max() <= lip * (1 + TOL)
        assert torch.all(jn_e <= ex[: len(jn_e)] * (1 + 1e-5) + 1e-6)  # power iteration is a lower bound
        best, _ = hill_climb_jacobian(net, inputs_e[:3], rounds=3, norm_fn=lambda z: exact_jacobian_norm(net, z))
        _note(f"{name}: e Jacobian, exact, hill-climbed", best.max())
        assert best.max() <= lip * (1 + TOL)
    return net


def test_cpu_tiny_embedding_is_1_lipschitz_at_random_and_adversarial_inputs():
    _audit("cpu-tiny", get_preset("cpu-tiny"), exact=True, pi_iters=30, ratio_steps=40, n_random=6)


@pytest.mark.parametrize("preset,effort", [("cpu-small", (10, 8, 2)), ("cpu-base", (6, 5, 1)), ("cpu-large", (6, 5, 1))])
def test_cpu_presets_are_1_lipschitz_at_random_and_adversarial_inputs(preset, effort):
    pi_iters, ratio_steps, n_random = effort  # (96 and 128 px cost more per step: fewer steps there)
    _audit(preset, get_preset(preset), exact=False, pi_iters=pi_iters, ratio_steps=ratio_steps, n_random=n_random)


def test_official_width_network_is_1_lipschitz():
    _audit("official widths (45 ch, 3 conv, 2 dense, 32 px)", OFFICIAL_REDUCED, exact=False, pi_iters=15,
           ratio_steps=12, n_random=2)


def test_normalised_network_is_bounded_by_one_over_min_std():
    assert NORMALISED.lipschitz == pytest.approx(1 / 0.224)
    net = _audit("cpu-tiny, mean/std normalised", NORMALISED, exact=True, pi_iters=20, ratio_steps=20, n_random=3)
    # The bound is needed: the normalisation alone stretches by 1/min(std) in the green channel.
    x = torch.rand(1, 3, 32, 32)
    v = torch.zeros_like(x)
    v[:, 1] = 1
    _, jv = torch.func.jvp(lambda z: (z - net.mean) / net.std, (x,), (v / v.norm(),))
    assert jv.norm().item() == pytest.approx(1 / 0.224, rel=1e-5)


def test_space_to_depth_network_is_1_lipschitz():
    # pixel_unshuffle only permutes coordinates: norms of differences are kept exactly.
    a, b = torch.rand(2, 4, 3, 32, 32)
    moved = torch.nn.functional.pixel_unshuffle(a - b, 2)
    assert moved.shape == (4, 12, 16, 16)
    assert torch.equal(moved.flatten(1).sort(1).values, (a - b).flatten(1).sort(1).values)
    assert UNSHUFFLED.features == 12 * (32 // 8) ** 2 and UNSHUFFLED.lipschitz == 1.0
    _audit("unshuffle 2 (12 ch, 32 px)", UNSHUFFLED, exact=True, pi_iters=20, ratio_steps=20, n_random=3)


def test_space_to_depth_config_is_checked():
    with pytest.raises(ValueError, match="unshuffle·pool_size"):
        dataclasses.replace(UNSHUFFLED, input_size=36)
    with pytest.raises(ValueError, match="input channels"):
        dataclasses.replace(UNSHUFFLED, channels=8)
    assert LipSimConfig.from_json(UNSHUFFLED.to_json()) == UNSHUFFLED


def test_audit_detects_a_network_that_is_not_1_lipschitz(monkeypatch):
    # Control: with T⁻¹ tripled (T no longer ⪰ WᵀW) the same tools must find norms above 1,
    # otherwise the passing audits above would prove nothing.
    from encoder.layers import SLLConv2d, SLLLinear

    conv_inv_t, lin_inv_t = SLLConv2d.inv_t, SLLLinear.inv_t
    monkeypatch.setattr(SLLConv2d, "inv_t", lambda self: 3 * conv_inv_t(self))
    monkeypatch.setattr(SLLLinear, "inv_t", lambda self: 3 * lin_inv_t(self))
    net = _net(get_preset("cpu-tiny"), frozen=False)
    x = torch.rand(2, 3, 32, 32)
    assert power_iteration_norm(lambda z: _trunk(net, z), x, iters=20).max() > 1.05
    ratio, _, _ = max_ratio_search(lambda z: _trunk(net, z), x, (x + 0.01 * torch.randn_like(x)).clamp(0, 1), steps=10)
    assert ratio.max() > 1 + 100 * TOL


def test_network_stays_1_lipschitz_after_adversarial_training_steps():
    # Adam with a large learning rate on every weight, maximising the expansion of the embedding
    # on dark image pairs; then audit exactly.
    net = _net(get_preset("cpu-tiny"), frozen=False).train()
    opt = torch.optim.Adam(net.parameters(), lr=0.2)
    gen = torch.Generator().manual_seed(2)
    for _ in range(12):
        x = torch.rand(8, 3, 32, 32, generator=gen) * 0.05
        y = (x + 0.01 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
        ratio = (net(x) - net(y)).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
        opt.zero_grad()
        (-ratio.mean()).backward()
        opt.step()
    net.freeze()
    x = torch.cat([torch.rand(4, 3, 32, 32, generator=gen) * 0.05, _special_inputs(32)])
    ex = exact_jacobian_norm(net, x)
    _note("cpu-tiny after adversarial Adam: e Jacobian, exact", ex.max())
    assert ex.max() <= 1 + TOL
    r, _, _ = max_ratio_search(net, x[:4], (x[:4] + 0.01).clamp(0, 1), steps=20, lr=0.01)
    _note("cpu-tiny after adversarial Adam: e ratio, ascent", r.max())
    assert r.max() <= 1 + TOL


@pytest.mark.parametrize("config", [get_preset("cpu-tiny"), NORMALISED, OFFICIAL_REDUCED, UNSHUFFLED],
                         ids=["tiny", "norm", "45ch", "unshuffle"])
def test_frozen_inference_form_matches_unfrozen_within_1e_5(config):
    net = _net(config, frozen=False)
    x = torch.rand(5, 3, config.input_size, config.input_size)
    with torch.no_grad():
        ref = net(x)
        net.freeze()
        assert net.frozen and not any(p.requires_grad for p in net.parameters())
        out = net(x)
    assert (out - ref).abs().max().item() <= 1e-5


def test_refreeze_after_weight_changes_and_train_unfreezes():
    enc = LipSimEncoder(get_preset("cpu-tiny")).freeze()
    x = torch.rand(3, 3, 32, 32)
    before = enc.embed(x)
    enc.train()
    assert not enc.net.frozen and all(p.requires_grad for p in enc.parameters())
    opt = torch.optim.Adam(enc.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        enc.embed(torch.rand(4, 3, 32, 32))[:, 0].sum().backward()
        opt.step()
    with torch.no_grad():
        unfrozen = enc.embed(x)
    enc.freeze()
    frozen = enc.embed(x)
    assert (frozen - unfrozen).abs().max().item() <= 1e-5
    assert (frozen - before).abs().max().item() > 1e-4  # the weights did change
    # A weight change made while frozen (here through load_state_dict) refolds automatically.
    state = {k: v * 0.9 if k.endswith("kernel") else v for k, v in enc.net.state_dict().items()}
    enc.net.load_state_dict(state)
    after = enc.embed(x)
    enc.unfreeze()
    with torch.no_grad():
        assert (after - enc.embed(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("train", [True, False])
def test_no_nan_or_inf_for_inputs_in_unit_box(batch, train):
    net = _net(get_preset("cpu-tiny"), frozen=not train)
    net.train(train)
    for fill in (0.0, 1.0, None):
        x = torch.rand(batch, 3, 32, 32) if fill is None else torch.full((batch, 3, 32, 32), fill)
        x.requires_grad_(True)
        e = net(x)
        assert torch.isfinite(e).all()
        torch.testing.assert_close(e.norm(dim=1), torch.ones(batch))
        e[:, :3].sum().backward()
        assert torch.isfinite(x.grad).all()
        if train:
            assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_all_zero_kernels_give_finite_embeddings_and_gradients():
    net = _net(get_preset("cpu-tiny"), frozen=False).train()
    with torch.no_grad():
        for layer in net.sll_layers():
            (layer.kernel if hasattr(layer, "kernel") else layer.weight).zero_()
    x = torch.zeros(2, 3, 32, 32, requires_grad=True)  # f = [0…0, 1]: the constant coordinate alone
    e = net(x)
    torch.testing.assert_close(e, torch.nn.functional.one_hot(torch.tensor([32, 32]), 33).float())
    e.sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in net.parameters())
    net.freeze()
    assert torch.isfinite(net(torch.rand(1, 3, 32, 32))).all()


def test_embedding_shape_constant_coordinate_and_protocol(tiny_lipsim):
    enc = tiny_lipsim
    assert isinstance(enc, Encoder)
    assert (enc.dim, enc.input_size, enc.lipschitz) == (33, 32, 1.0)
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    e = enc.embed(x)
    f = enc.net.features(x)
    assert e.shape == (2, 33) and torch.all(f.norm(dim=1) >= 1) and torch.all(f[:, -1] == 1)
    torch.testing.assert_close(e[:, -1], 1 / f.norm(dim=1))
    torch.testing.assert_close(enc.distance(x, y), 1 - (enc.embed(x) * enc.embed(y)).sum(1))
    torch.testing.assert_close(enc(x, y), enc.distance(y, x))
    with pytest.raises(ValueError, match="expects"):
        enc.embed(torch.rand(1, 3, 16, 16))
    xr = x.clone().requires_grad_(True)
    enc.distance(xr, y).sum().backward()  # differentiable in x even when frozen
    assert xr.grad.abs().sum() > 0


def test_load_metric_returns_model_and_preprocess():
    from PIL import Image

    model, preprocess = load_metric("lipsim:cpu-tiny")
    a = preprocess(Image.new("RGB", (50, 40), (200, 10, 10)))
    b = preprocess(Image.new("RGB", (20, 70), (10, 10, 200)))
    assert a.shape == (1, 3, 32, 32) and 0 <= a.min() and a.max() <= 1
    d = model(a, b)
    assert d.shape == (1,) and 0 < d.item() <= 2
    assert model(a, a).abs().item() < 1e-6


def test_preset_random_weights_are_seeded_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    e1 = load_encoder("lipsim:cpu-tiny")
    after = torch.rand(3)
    e2 = load_encoder("lipsim:cpu-tiny")
    assert torch.equal(after, expected)
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(e1.embed(x), e2.embed(x))
    assert "random" in e1.name and e1.info()["weights"].startswith("random")
    assert not e1.pretrained and load_encoder("lipsim:demo").pretrained  # the fact is an attribute, not the name
