"""dreamsim:<variant> through the real dreamsim() loader, from a cache synthesised in the release format."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from _dreamsim_fixtures import SYNTHETIC_VARIANTS
from encoder import EncoderError, list_encoders, load_encoder
from encoder.dreamsim_backend import ENV_CACHE, VARIANTS, _patch_embedding, expected_files, resolve_cache_dir

# One intra-op thread: a few ViT-B/32 images; a second thread mostly waits on a busy CPU.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def synthetic_encoder(request, synthetic_dreamsim, no_network):
    return synthetic_dreamsim(request.param)


def test_variants_are_exactly_those_of_the_installed_dreamsim_package():
    from dreamsim.config import dreamsim_args, dreamsim_weights
    from dreamsim.model import EMBED_DIMS

    assert set(VARIANTS) == set(dreamsim_args["model_config"]) == set(dreamsim_weights)
    for name, v in VARIANTS.items():
        cfg = dreamsim_args["model_config"][name]
        dim = sum(EMBED_DIMS[m][f.split("_")[0]] for m, f in zip(cfg["model_type"].split(","),
                                                                   cfg["feat_type"].split(",")))
        assert v.dim == dim * (2 if v.patch else 1), name
    assert {f"dreamsim:{v}" for v in VARIANTS} <= set(list_encoders())


@pytest.mark.parametrize("synthetic_encoder", SYNTHETIC_VARIANTS, indirect=True)
def test_single_branch_clip_variants_embed_like_dreamsim(synthetic_encoder):
    enc = synthetic_encoder
    assert (enc.dim, enc.input_size, enc.lipschitz) == (512, 224, None)
    torch.manual_seed(0)
    a, b = torch.rand(2, 3, 224, 224), torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        ea, eb = enc.embed(a), enc.embed(b)
        reference = enc.model(a, b)  # dreamsim's own forward: 1 − cosine of its embeddings
    assert ea.shape == (2, 512)
    assert torch.allclose(ea.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(1 - (ea * eb).sum(1), reference, atol=1e-5)  # = enc.distance(a, b)
    with torch.no_grad():
        single = enc.embed(a[:1])  # dreamsim squeezes the batch dimension: a batch of one must survive it
    assert single.shape == (1, 512) and torch.allclose(single, ea[:1], atol=1e-5)


@pytest.mark.parametrize("synthetic_encoder", SYNTHETIC_VARIANTS, indirect=True)
def test_input_gradients_flow_through_the_dreamsim_model(synthetic_encoder):
    x = torch.rand(1, 3, 224, 224, requires_grad=True)
    direction = torch.randn(512, generator=torch.Generator().manual_seed(1))
    (synthetic_encoder.embed(x) @ direction).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("synthetic_encoder", SYNTHETIC_VARIANTS[:1], indirect=True)
def test_the_lora_adapter_from_the_cache_is_loaded(synthetic_encoder, release_cache):
    from safetensors.torch import load_file

    saved = load_file(release_cache / "clip_vitb32_single_lora" / "adapter_model.safetensors")
    key = next(k for k in saved if "lora_B" in k)
    params = dict(synthetic_encoder.model.named_parameters())
    loaded = next(v for k, v in params.items() if k.replace(".default", "") == key)
    assert saved[key].abs().sum() > 0 and torch.equal(loaded, saved[key])


@pytest.mark.parametrize("variant", ["clip_vitb32", "ensemble", "dinov2_vitb14_patch", "synclr_vitb16"])
def test_missing_weights_error_names_variant_files_and_release_zip(variant, tmp_path, no_network):
    from dreamsim.config import dreamsim_weights

    with pytest.raises(EncoderError) as info:
        load_encoder(f"dreamsim:{variant}", cache_dir=tmp_path)
    msg = str(info.value)
    assert f"dreamsim:{variant}" in msg and str(tmp_path) in msg
    for rel in expected_files(variant):
        assert rel in msg
    assert dreamsim_weights[variant] in msg
    assert list(tmp_path.iterdir()) == []  # nothing downloaded, nothing created


def test_partial_cache_marks_only_the_missing_files(release_cache, tmp_path, no_network):
    (tmp_path / "clip_vitb32_pretrain.pth.tar").symlink_to(release_cache / "clip_vitb32_pretrain.pth.tar")
    with pytest.raises(EncoderError) as info:
        load_encoder("dreamsim:clip_vitb32", cache_dir=tmp_path)
    lines = str(info.value).splitlines()
    assert any("clip_vitb32_single_lora/adapter_config.json" in l and "missing" in l for l in lines)
    assert not any("clip_vitb32_pretrain.pth.tar" in l and "missing" in l for l in lines)


def test_cache_dir_argument_beats_environment_variable_beats_default(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(ENV_CACHE, raising=False)
    assert resolve_cache_dir(None)[0] == tmp_path / "xdg" / "robret" / "dreamsim"
    monkeypatch.setenv(ENV_CACHE, str(tmp_path / "env"))
    assert resolve_cache_dir(None)[0] == tmp_path / "env"
    assert resolve_cache_dir(tmp_path / "arg")[0] == tmp_path / "arg"


def test_environment_variable_names_the_directory_in_the_error(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv(ENV_CACHE, str(tmp_path))
    with pytest.raises(EncoderError, match=ENV_CACHE):
        load_encoder("dreamsim:open_clip_vitb32")


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(ValueError, match="clip_vitb32"):
        load_encoder("dreamsim:vit_huge")


def test_patch_embedding_gives_dreamsims_patch_model_distance():
    from dreamsim.model import PerceptualModel, normalize_embedding_patch

    torch.manual_seed(0)
    ta, tb = (normalize_embedding_patch(torch.randn(3, 1 + 16, 8)) for _ in range(2))
    # PerceptualModel.forward on embeddings given directly (its embed replaced by the identity)
    stub = SimpleNamespace(embed=lambda t: t, feat_type_list=["cls_patch"])
    reference = PerceptualModel.forward(stub, ta, tb)
    ea, eb = _patch_embedding(ta), _patch_embedding(tb)
    assert torch.allclose(ea.norm(dim=1), torch.ones(3), atol=1e-6)
    assert torch.allclose(1 - (ea * eb).sum(1), reference, atol=1e-6)


def test_cli_encoder_info_on_the_synthesised_cache(release_cache, capsys, no_network):
    from retrieval.cli import main

    assert main(["encoder", "info", "dreamsim:clip_vitb32", "--cache-dir", str(release_cache), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["name"] == "dreamsim:clip_vitb32"
    assert (info["dim"], info["input_size"], info["lipschitz"]) == (512, 224, None)
    assert info["cache_dir"] == str(release_cache.resolve())


def test_cli_reports_missing_weights_without_a_traceback(tmp_path, capsys, no_network):
    from retrieval.cli import main

    assert main(["encoder", "info", "dreamsim:clip_vitb32", "--cache-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "clip_vitb32_single_lora/adapter_config.json" in err and "Traceback" not in err


@pytest.mark.parametrize("synthetic_encoder", SYNTHETIC_VARIANTS[:1], indirect=True)
def test_throughput_benchmark_builds_the_same_architecture_as_dreamsim(synthetic_encoder):
    from benchmarks.throughput import build_dreamsim_arch

    def shapes(model):
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}

    assert shapes(build_dreamsim_arch("clip_vitb32")) == shapes(synthetic_encoder.model)
