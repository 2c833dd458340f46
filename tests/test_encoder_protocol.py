"""The Encoder protocol (DESIGN.md) on every spec `list_encoders()` names, as timm tests every
registered model with the same checks.

Each spec falls in one of three cases, decided from the registry itself:
  * built with its weights (bundled checkpoints, random-weight presets up to BIG_PARAMS parameters,
    pixels, and the DreamSim variants a synthesised release cache can hold): embeddings are
    unit-norm (B, dim), batch-independent and differentiable in x (black and white images too);
    `model(a, b)`, the distance, equals 1 − the cosine of the embeddings; `lipschitz` is None or a
    positive number, and where it is a number, random pairs and dark nearby pairs never stretch
    beyond it (the ratios found are shown in the terminal summary);
  * LipSim presets above BIG_PARAMS (the official 224 px shapes, 63M–723M parameters, seconds to
    minutes to build): each preset's shape against the paper's table (OFFICIAL_SHAPES), and the
    smallest one built through the registry on the meta device (one cheap check for all of them:
    dim, input size, bound, parameter count, a forward pass's output shape). Their numbers come
    from the same LipSimEncoder code the cpu-* presets run in the first case;
  * DreamSim variants whose backbones come through torch.hub (DINO, DINOv2, SynCLR, the ensemble):
    skipped, their weights are not on a test machine; they share DreamSimEncoder with the
    synthesised single-branch variants.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

from _audit import TOL
from _dreamsim_fixtures import SYNTHETIC_VARIANTS
from _report import note_max
from encoder import PRESETS, Encoder, list_encoders, load_encoder

pytestmark = pytest.mark.usefixtures("one_thread")

BIG_PARAMS = 20_000_000  # above this a random-weight preset is checked for its shape only
# LipSim (Ghazanfari et al., ICLR 2024; DESIGN.md): conv layers, channels, dense layers, dense width;
# all with conv inner dimension 5, 224 px input and D = 1792 kept coordinates.
OFFICIAL_SHAPES = {"small": (20, 45, 7, 1024), "medium": (30, 60, 10, 2048), "large": (50, 90, 10, 2048),
                   "xlarge": (70, 120, 15, 2048)}

SPECS = list_encoders()


def _lipsim_preset(spec: str):
    prefix, _, arg = spec.partition(":")
    return PRESETS[arg] if prefix == "lipsim" and arg in PRESETS else None


def _is_big(spec: str) -> bool:
    cfg = _lipsim_preset(spec)
    return cfg is not None and cfg.num_params() > BIG_PARAMS


def _needs_absent_weights(spec: str) -> bool:
    prefix, _, arg = spec.partition(":")
    return prefix == "dreamsim" and arg not in SYNTHETIC_VARIANTS


def _needs_a_fetch(spec: str) -> bool:
    """Official LipSim checkpoints arrive only through `robret weights fetch` (none on a test machine)."""
    prefix, _, arg = spec.partition(":")
    return prefix == "lipsim" and arg.startswith("official-")


def _built(spec: str):
    if _needs_a_fetch(spec):
        return pytest.param(spec, marks=pytest.mark.skip(
            reason=f"{spec} needs `robret weights fetch`; tests/test_weights.py fetches a synthesised "
                   "official-format checkpoint from a loopback server, loads and embeds it"))
    if _needs_absent_weights(spec):
        return pytest.param(spec, marks=pytest.mark.skip(
            reason=f"{spec} needs the released DreamSim weights (backbone through torch.hub); the "
                   f"synthesised cache covers {', '.join(SYNTHETIC_VARIANTS)} on the same DreamSimEncoder"))
    return spec


BUILT = [_built(s) for s in SPECS if not _is_big(s)]
BIG = [s for s in SPECS if _is_big(s)]


@functools.lru_cache(maxsize=None)
def _load(spec: str):
    return load_encoder(spec)


@pytest.fixture
def registered(spec, request):
    """The encoder `spec` names, built once per session the way a user gets it (`load_encoder(spec)`);
    DreamSim from the synthesised release cache, without network."""
    prefix, _, arg = spec.partition(":")
    if prefix == "dreamsim":
        request.getfixturevalue("no_network")
        return request.getfixturevalue("synthetic_dreamsim")(arg)
    return _load(spec)


def test_registry_names_each_spec_once_including_bundled_and_baseline_encoders():
    assert len(SPECS) == len(set(SPECS)) and BIG and BUILT
    assert all(spec in SPECS for spec in ("lipsim:demo", "lipsim:cpu-tiny", "pixels", "standard:demo"))


@pytest.mark.parametrize("spec", BUILT)
def test_registered_encoder_embeds_to_unit_norm_and_distance_is_one_minus_cosine(registered):
    enc = registered
    assert isinstance(enc, Encoder) and isinstance(enc.name, str) and enc.name
    s = enc.input_size
    gen = torch.Generator().manual_seed(0)
    # Extremes and random images; two per batch keeps the 224 px DreamSim cases cheap.
    a = torch.cat([torch.zeros(1, 3, s, s), torch.rand(1, 3, s, s, generator=gen)])
    b = torch.cat([torch.ones(1, 3, s, s), torch.rand(1, 3, s, s, generator=gen)])
    with torch.no_grad():
        ea, eb = enc.embed(a), enc.embed(b)
    x = a[1:].clone().requires_grad_(True)
    d = enc(x, b[1:])  # one pair alone against the batched embeddings: no mixing across a batch
    assert ea.shape == eb.shape == (2, enc.dim) and ea.dtype == torch.float32
    torch.testing.assert_close(torch.cat([ea, eb]).norm(dim=1), torch.ones(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(d.detach().double(), 1 - ea[1:].double() @ eb[1].double(), atol=1e-5, rtol=0)
    d.sum().backward()  # differentiable in x (attacks need it)
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("spec", BUILT)
def test_registered_encoder_states_a_bound_or_none_and_random_pairs_stay_within_it(spec, registered):
    enc = registered
    bound = enc.lipschitz
    if bound is None:  # nothing guaranteed (DreamSim, standard CNNs): nothing more to check
        return
    assert isinstance(bound, float) and 0 < bound < math.inf
    cfg = _lipsim_preset(spec)
    if cfg is not None:
        assert bound == cfg.lipschitz
    s = enc.input_size
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(2, 3, 3, s, s, generator=gen)
    dark = x * 0.03  # near-black images: ‖f‖ close to 1, where a normalised embedding stretches most
    near = (dark + 1e-3 * torch.randn(dark.shape, generator=gen)).clamp(0, 1)
    a, b = torch.cat([x, dark]), torch.cat([y, near])
    with torch.no_grad():
        ratio = (enc.embed(a) - enc.embed(b)).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
    note_max("encoder protocol: largest ratio / L on random and dark nearby pairs", spec, ratio.max() / bound)
    assert ratio.max() <= bound * (1 + TOL), ratio


@pytest.mark.parametrize("spec", BIG)
def test_big_lipsim_preset_is_the_official_shape(spec):
    cfg = _lipsim_preset(spec)
    assert (cfg.conv_depth, cfg.channels, cfg.linear_depth, cfg.linear_inner) == OFFICIAL_SHAPES[spec.split(":")[1]]
    assert (cfg.conv_inner, cfg.input_size, cfg.embed_dim, cfg.lipschitz) == (5, 224, 1792, 1.0)


def test_smallest_big_lipsim_preset_builds_through_the_registry_on_the_meta_device():
    spec = min(BIG, key=lambda s: _lipsim_preset(s).num_params())
    cfg = _lipsim_preset(spec)
    with torch.device("meta"):
        enc = load_encoder(spec, device="meta")
        out = enc.embed(torch.empty(2, 3, cfg.input_size, cfg.input_size))
    assert isinstance(enc, Encoder)
    assert (enc.dim, enc.input_size, enc.lipschitz) == (cfg.embed_dim + 1, cfg.input_size, cfg.lipschitz)
    assert enc.num_params() == cfg.num_params() > BIG_PARAMS
    assert out.shape == (2, enc.dim)
