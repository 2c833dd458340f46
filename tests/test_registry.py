"""encoder/registry.py: backends register by decorator; unknown names list what exists; whether
weights are trained is an attribute (`pretrained`), never read from a display name."""
from __future__ import annotations

import pytest
import torch

from encoder import registry
from encoder.pixels import PixelsEncoder
from encoder.registry import list_encoders, load_encoder, register_backend


@pytest.fixture
def scratch_backend():
    made = []

    @register_backend("scratch", lister=lambda: ["8", "16"])
    def _scratch(arg: str, **kwargs):
        made.append((arg, kwargs))
        enc = PixelsEncoder(int(arg))
        enc.name = "scratch (any display name)"
        return enc

    yield made
    registry._BACKENDS.pop("scratch")
    registry._LISTERS.pop("scratch")


def test_a_decorated_factory_is_listed_and_loaded_with_its_arguments(scratch_backend):
    assert {"scratch:8", "scratch:16"} <= set(list_encoders())
    enc = load_encoder("scratch:16", extra=3)
    assert scratch_backend == [("16", {"extra": 3})] and enc.input_size == 16 and not enc.training


def test_every_backend_of_the_package_is_registered_without_importing_it_by_name():
    prefixes = {spec.partition(":")[0] for spec in list_encoders()}
    assert {"lipsim", "standard", "dreamsim", "pixels"} <= prefixes


@pytest.mark.parametrize("spec,listed", [
    ("nosuch:thing", "lipsim:cpu-tiny"),
    ("lipsim:nosuch", "cpu-tiny"),
    ("standard:nosuch", "not bundled"),
    ("dreamsim:nosuch", "ensemble"),
    ("pixels:big", "pixels:64"),
])
def test_unknown_names_raise_a_value_error_listing_what_exists(spec, listed):
    with pytest.raises(ValueError, match="unknown") as info:
        load_encoder(spec)
    assert listed in str(info.value)


def test_pretrained_is_an_attribute_independent_of_the_name():
    random = load_encoder("lipsim:cpu-tiny")
    assert random.pretrained is False
    for spec in ("lipsim:demo", "standard:demo", "pixels"):
        assert load_encoder(spec).pretrained is True, spec
    random.name = "lipsim:renamed"  # a display name says nothing about the weights
    assert random.pretrained is False


def test_training_in_place_marks_the_weights_trained():
    from encoder.lipsim import LipSimEncoder
    from encoder.presets import get_preset
    from encoder.standard import StandardConfig, StandardEncoder
    from encoder.train import DistillConfig, EncoderTeacher, distill

    torch.manual_seed(0)
    teacher = StandardEncoder(StandardConfig(input_size=16, widths=(8,), embed_dim=32)).freeze()
    student = LipSimEncoder(get_preset("cpu-tiny"))
    assert not student.pretrained
    photos = [torch.rand(3, 24, 24) for _ in range(2)]
    distill(student, EncoderTeacher(teacher), photos, DistillConfig(steps=1, batch_size=2, device="cpu"),
            progress=False)
    assert student.pretrained
