"""Per-layer Lipschitz audit of encoder/layers.py (SLLConv2d, SLLLinear, PadChannels, SumPool2d).

An SLL layer's Jacobian is J(x) = I − 2·Aᵀ·T⁻¹·D(x)·A with D(x) the 0/1 ReLU pattern, so
−I ⪯ J ⪯ I for *every* input exactly when the all-active matrix I − 2·Aᵀ·T⁻¹·A has its smallest
eigenvalue ≥ −1 (AᵀT⁻¹DA grows with D, and eigenvalues ≤ 1 hold for any D ⪰ 0). The tests check
that worst case directly (it covers every input), plus exact Jacobians at random inputs and the
ratio at pairs a gradient search picked, for random weights and for weights after adversarial Adam
steps that try to make the layer expand.
Tolerance: 1 + 1e-4 (float32 rounding is ~1e-6).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _audit import TOL, exact_jacobian_norm, max_ratio_search, power_iteration_norm
from _report import MEASURED, note_max
from encoder.layers import PadChannels, SLLConv2d, SLLLinear, SumPool2d, safe_inv

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:FutureWarning")]

# The largest norms seen, shown in pytest's terminal summary.
AUDIT_SECTION = "layer audit: largest norm and ratio found (bound 1)"


def _note(key: str, value: float) -> None:
    note_max(AUDIT_SECTION, key, value)


def _conv_operator(layer: SLLConv2d, hw: int) -> torch.Tensor:
    """The conv2d(·, K) map (C·hw² → inner·hw²) as a dense float64 matrix."""
    n = layer.channels * hw * hw
    eye = torch.eye(n, dtype=torch.float64).view(n, layer.channels, hw, hw)
    out = F.conv2d(eye, layer.kernel.detach().double(), padding=layer.padding)
    return out.reshape(n, -1).T  # (inner·hw², C·hw²)


def worst_case_norm_conv(layer: SLLConv2d, hw: int, record: bool = True) -> float:
    """‖I − 2AᵀT⁻¹A‖₂, all ReLUs active. Every J(x) (inputs of side hw) has its eigenvalues in
    [λ_min(all active), 1], so this ≤ 1 (with −λ_min ≤ 1) bounds ‖J(x)‖ by 1 for every input."""
    a = _conv_operator(layer, hw)
    inv_t = layer.inv_t().detach().double().repeat_interleave(hw * hw)
    j = torch.eye(a.shape[1], dtype=torch.float64) - 2 * a.T @ (inv_t[:, None] * a)
    return _symmetric_norm(j, "SLLConv2d" if record else None)


def worst_case_norm_linear(layer: SLLLinear, record: bool = True) -> float:
    w = layer.weight.detach().double()
    inv_t = layer.inv_t().detach().double()
    j = torch.eye(w.shape[1], dtype=torch.float64) - 2 * w.T @ (inv_t[:, None] * w)
    return _symmetric_norm(j, "SLLLinear" if record else None)


def _symmetric_norm(j: torch.Tensor, key: str | None) -> float:
    """‖J‖₂ of a symmetric J = I − 2AᵀSA, S ⪰ 0: its eigenvalues are ≤ 1 by construction (directions
    outside A's row space give exactly 1); −λ_min ≤ 1 is what T ⪰ AAᵀ buys, recorded separately."""
    eig = torch.linalg.eigvalsh(j)
    if key:
        _note(f"{key} −λ_min of the all-active Jacobian", -eig.min())
    return eig.abs().max().item()


def _adversarial_training(layer, x_shape, steps: int = 15, lr: float = 0.3, seed: int = 0) -> None:
    """Adam with a large learning rate on the weights, maximising the layer's expansion ratio
    ‖h(x) − h(y)‖/‖x − y‖ on random pairs: the weights a careless or hostile training run reaches."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    for _ in range(steps):
        x = torch.rand(x_shape, generator=gen) * 4 - 2
        y = x + 0.05 * torch.randn(x_shape, generator=gen)
        ratio = (layer(x) - layer(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
        opt.zero_grad()
        (-ratio.mean()).backward()
        opt.step()


def _check_conv(layer: SLLConv2d, key: str, hw: int = 6) -> None:
    worst = worst_case_norm_conv(layer, hw)
    _note(f"{key} worst case (all active)", worst)
    assert worst <= 1 + TOL
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(4, layer.channels, hw, hw, generator=gen) * 4 - 2
    exact = exact_jacobian_norm(layer, x)
    _note(f"{key} Jacobian at random x", exact.max())
    assert exact.max() <= 1 + TOL
    ratio, _, _ = max_ratio_search(lambda z: layer(z * 4 - 2), x.add(2).div(4).clamp(0, 1),
                                   torch.rand(x.shape, generator=gen), steps=25, lr=0.05)
    # The search moves in z = (x + 2)/4, which shrinks distances by 4: undo it.
    _note(f"{key} max ratio found", ratio.max() / 4)
    assert ratio.max() / 4 <= 1 + TOL


def _check_linear(layer: SLLLinear, key: str) -> None:
    worst = worst_case_norm_linear(layer)
    _note(f"{key} worst case (all active)", worst)
    assert worst <= 1 + TOL
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, layer.features, generator=gen)
    exact = exact_jacobian_norm(layer, x)
    _note(f"{key} Jacobian at random x", exact.max())
    assert exact.max() <= 1 + TOL
    ratio, _, _ = max_ratio_search(lambda z: layer(z * 4 - 2), torch.rand(x.shape, generator=gen),
                                   torch.rand(x.shape, generator=gen), steps=25, lr=0.05)
    _note(f"{key} max ratio found", ratio.max() / 4)
    assert ratio.max() / 4 <= 1 + TOL


@pytest.mark.parametrize("channels,inner", [(4, 3), (3, 8), (5, 5)])
def test_sll_conv_is_1_lipschitz_for_random_weights_at_every_input(channels, inner):
    torch.manual_seed(channels * 10 + inner)
    layer = SLLConv2d(channels, inner)
    _check_conv(layer, "SLLConv2d random")


@pytest.mark.parametrize("features,inner", [(12, 7), (8, 30), (20, 20)])
def test_sll_linear_is_1_lipschitz_for_random_weights_at_every_input(features, inner):
    torch.manual_seed(features * 100 + inner)
    layer = SLLLinear(features, inner)
    _check_linear(layer, "SLLLinear random")


def test_sll_conv_stays_1_lipschitz_after_adversarial_adam_steps():
    torch.manual_seed(3)
    layer = SLLConv2d(4, 6)
    _adversarial_training(layer, (8, 4, 6, 6))
    assert layer.q.abs().max() > 1.5  # the large learning rate really moved the weights
    _check_conv(layer, "SLLConv2d trained")


def test_sll_linear_stays_1_lipschitz_after_adversarial_adam_steps():
    torch.manual_seed(4)
    layer = SLLLinear(16, 24)
    _adversarial_training(layer, (8, 16))
    _check_linear(layer, "SLLLinear trained")


def test_sll_bound_is_tight_enough_to_matter():
    # Gershgorin with q: a rank-one kernel whose Gram is a single positive entry makes T = WWᵀ,
    # so the all-active Jacobian has eigenvalue exactly −1: the bound is attained, not loose.
    layer = SLLLinear(5, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 0.0, -1.0, 0.5]]))
    assert worst_case_norm_linear(layer) == pytest.approx(1.0, abs=1e-6)
    x = torch.zeros(1, 5)
    with torch.no_grad():
        layer.bias.fill_(10.0)  # every ReLU active at every x near 0
    assert exact_jacobian_norm(layer, x).item() == pytest.approx(1.0, abs=1e-5)


def test_audit_detects_a_layer_whose_t_is_too_small(monkeypatch):
    # Control for the checks above: halve T (T ⋡ WᵀW) and the worst case and the exact Jacobian at
    # an all-active input must exceed 1.
    layer = SLLConv2d(4, 4)
    with torch.no_grad():
        layer.bias.fill_(5.0)
    inv_t = SLLConv2d.inv_t
    monkeypatch.setattr(SLLConv2d, "inv_t", lambda self: 2 * inv_t(self))
    assert worst_case_norm_conv(layer, 6, record=False) > 1.2
    assert exact_jacobian_norm(layer, torch.rand(2, 4, 6, 6)).max() > 1.2


def test_power_iteration_agrees_with_the_exact_jacobian_norm():
    torch.manual_seed(5)
    layer = SLLConv2d(4, 4)
    with torch.no_grad():
        layer.bias.fill_(5.0)  # all active: the worst-case Jacobian, norm close to 1
    x = torch.rand(3, 4, 6, 6)
    exact = exact_jacobian_norm(layer, x)
    approx = power_iteration_norm(layer, x, iters=200)
    assert torch.all(approx <= exact + 1e-5)
    assert torch.allclose(approx, exact, atol=2e-3)


@pytest.mark.parametrize("cls,shape", [(SLLConv2d, (2, 3, 5, 5)), (SLLLinear, (2, 3))])
def test_zero_kernel_gives_identity_with_finite_gradients(cls, shape):
    layer = SLLConv2d(3, 4) if cls is SLLConv2d else SLLLinear(3, 4)
    param = layer.kernel if cls is SLLConv2d else layer.weight
    with torch.no_grad():
        param.zero_()
    x = torch.rand(shape, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, x)
    y.square().sum().backward()
    for p in (x, *layer.parameters()):
        assert torch.isfinite(p.grad).all()
    layer.freeze()
    assert torch.equal(layer(x), x)


def test_partly_zero_kernel_rows_are_dropped_not_nan():
    layer = SLLConv2d(3, 4)
    with torch.no_grad():
        layer.kernel[1].zero_()
    inv_t = layer.inv_t()
    assert inv_t[1] == 0 and torch.all(inv_t[[0, 2, 3]] > 0)
    x = torch.rand(2, 3, 5, 5, requires_grad=True)
    layer(x).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in (x, *layer.parameters()))
    assert worst_case_norm_conv(layer, 5) <= 1 + TOL


def test_safe_inv_values_and_gradient():
    t = torch.tensor([0.0, 2.0, 0.5], requires_grad=True)
    inv = safe_inv(t)
    assert inv.tolist() == [0.0, 0.5, 2.0]
    inv.sum().backward()
    assert t.grad.tolist() == [0.0, -0.25, -4.0]


def test_extreme_q_does_not_overflow():
    layer = SLLLinear(6, 5)
    with torch.no_grad():
        layer.q.copy_(torch.tensor([200.0, 199.0, 201.0, 200.5, 198.0]))  # exp(200) is inf in float32
    inv_t = layer.inv_t()
    assert torch.isfinite(inv_t).all() and torch.all(inv_t > 0)
    assert worst_case_norm_linear(layer) <= 1 + TOL


@pytest.mark.parametrize("batch", [1, 5])
def test_sll_layers_finite_in_train_and_eval_for_inputs_in_unit_box(batch):
    conv, lin = SLLConv2d(4, 4), SLLLinear(10, 7)
    for mode in (True, False):
        conv.train(mode)
        lin.train(mode)
        for x in (torch.zeros(batch, 4, 4, 4), torch.ones(batch, 4, 4, 4), torch.rand(batch, 4, 4, 4)):
            x = x.requires_grad_(True)
            y = conv(x)
            y.sum().backward()
            assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
        z = lin(torch.rand(batch, 10))
        assert torch.isfinite(z).all()


@pytest.mark.parametrize("make,shape", [(lambda: SLLConv2d(5, 3), (3, 5, 7, 9)),
                                        (lambda: SLLLinear(11, 6), (3, 11))])
def test_freeze_matches_unfrozen_forward_and_refreezes_after_weight_changes(make, shape):
    torch.manual_seed(7)
    layer = make()
    x = torch.randn(shape)
    ref = layer(x)
    layer.freeze()
    assert layer.frozen
    torch.testing.assert_close(layer(x), ref, atol=1e-6, rtol=0)
    # An optimiser step changes the weights in place: the stale fold is detected and recomputed.
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(torch.randn(shape)).square().sum().backward()
    opt.step()
    frozen_out = layer(x)
    layer.unfreeze()
    assert not layer.frozen
    torch.testing.assert_close(frozen_out, layer(x), atol=1e-6, rtol=0)
    # load_state_dict into a frozen layer refolds too.
    layer.freeze()
    state = {k: v * 0.7 for k, v in layer.state_dict().items()}
    layer.load_state_dict(state)
    out = layer(x)
    layer.unfreeze()
    torch.testing.assert_close(out, layer(x), atol=1e-6, rtol=0)
    assert "_folded" not in layer.state_dict()


def test_pad_channels_is_an_isometry():
    pad = PadChannels(8)
    x, y = torch.rand(4, 3, 5, 6), torch.rand(4, 3, 5, 6)
    px, py = pad(x), pad(y)
    assert px.shape == (4, 8, 5, 6) and torch.equal(px[:, :3], x) and not px[:, 3:].any()
    torch.testing.assert_close((px - py).flatten(1).norm(dim=1), (x - y).flatten(1).norm(dim=1))
    with pytest.raises(ValueError):
        PadChannels(2)(x)


def test_sum_pool_has_operator_norm_exactly_one():
    pool = SumPool2d(4)
    n = 2 * 8 * 8
    eye = torch.eye(n, dtype=torch.float64).view(n, 2, 8, 8)
    mat = pool(eye).reshape(n, -1).T
    sv = torch.linalg.svdvals(mat)
    _note("SumPool2d operator norm", sv.max())
    assert sv.max().item() == pytest.approx(1.0, abs=1e-12)
    const = torch.ones(1, 2, 8, 8)
    assert pool(const).norm().item() == pytest.approx(const.norm().item())
    torch.testing.assert_close(pool(const[:, :1]), torch.nn.AvgPool2d(4, divisor_override=4)(const[:, :1]))
    with pytest.raises(ValueError):
        pool(torch.ones(1, 1, 6, 8))


def test_every_recorded_layer_norm_is_within_the_bound():
    """Every maximum the tests above recorded (shown in the terminal summary) stays ≤ 1 + TOL."""
    assert all(v <= 1 + TOL for v in MEASURED.get(AUDIT_SECTION, {}).values())
