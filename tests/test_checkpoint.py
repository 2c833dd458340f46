"""robret checkpoints (encoder/checkpoint.py): safetensors + JSON header, strict loading, clear errors."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from encoder import CheckpointError, LipSimEncoder, get_preset, load_encoder, load_lipsim, save_lipsim
from encoder.checkpoint import read_header

NORMALISED = dataclasses.replace(get_preset("cpu-tiny"), mean=(0.5, 0.4, 0.3), std=(0.25, 0.5, 0.75))


def _encoder(config=None, seed=0):
    torch.manual_seed(seed)
    return LipSimEncoder(config or get_preset("cpu-tiny"))


@pytest.mark.parametrize("config", [get_preset("cpu-tiny"), NORMALISED], ids=["plain", "normalised"])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, config):
    enc = _encoder(config)
    path = save_lipsim(enc, tmp_path / "m.safetensors", preset="cpu-tiny", provenance={"steps": 3, "data": "x"})
    loaded = load_lipsim(path)
    assert loaded.config == config and loaded.lipschitz == config.lipschitz
    assert loaded.net.frozen and loaded.metadata["provenance"] == {"steps": 3, "data": "x"}
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        enc.freeze()
        assert torch.equal(loaded.embed(x), enc.embed(x))
    header = read_header(path)
    assert header["format"] == "robret-lipsim" and header["preset"] == "cpu-tiny" and header["config"] == config
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary file left behind
    unfrozen = load_lipsim(path, freeze=False)
    assert not unfrozen.net.frozen


def test_registry_loads_a_safetensors_path(tmp_path):
    enc = _encoder()
    path = save_lipsim(enc, tmp_path / "demo_like.safetensors")
    loaded = load_encoder(f"lipsim:{path}")
    assert loaded.name == "lipsim:demo_like" and loaded.dim == 33
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed(x), enc.eval().embed(x), atol=1e-6, rtol=0)


def test_missing_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_lipsim(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("keep", [0.5, 0.99, 10])
def test_truncated_file_is_a_clear_checkpoint_error(tmp_path, keep):
    path = save_lipsim(_encoder(), tmp_path / "m.safetensors")
    data = path.read_bytes()
    cut = int(len(data) * keep) if keep < 1 else keep
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_lipsim(path)


@pytest.mark.parametrize("content", [b"", b"hello world, not a checkpoint", b"\x00" * 64,
                                     json.dumps({"format": "robret-lipsim"}).encode()])
def test_wrong_format_file_is_a_checkpoint_error(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError):
        load_lipsim(path)


def test_foreign_safetensors_file_is_refused_by_format(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not a robret LipSim checkpoint"):
        load_lipsim(path)


def test_wrong_shapes_are_a_checkpoint_error(tmp_path):
    # cpu-small tensors under a cpu-tiny header
    small = _encoder(get_preset("cpu-small"))
    tensors = {k: v.contiguous() for k, v in small.net.state_dict().items()}
    meta = {"format": "robret-lipsim", "version": "1", "config": get_preset("cpu-tiny").to_json(), "preset": "x",
            "provenance": "{}"}
    path = tmp_path / "mismatch.safetensors"
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_lipsim(path)


def test_missing_and_unexpected_tensors_are_listed(tmp_path):
    tensors = {k: v.contiguous() for k, v in _encoder().net.state_dict().items()}
    tensors.pop("convs.0.q")
    tensors["extra.weight"] = torch.zeros(1)
    meta = {"format": "robret-lipsim", "version": "1", "config": get_preset("cpu-tiny").to_json(), "preset": "x",
            "provenance": "{}"}
    path = tmp_path / "keys.safetensors"
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match=r"missing \['convs.0.q'\].*unexpected \['extra.weight'\]"):
        load_lipsim(path)


@pytest.mark.parametrize("meta_change,match", [
    ({"version": "2"}, "version"),
    ({"config": "{not json"}, "corrupt robret header"),
    ({"config": json.dumps({"input_size": 32, "bogus": 1})}, "corrupt robret header"),
    ({"provenance": "[unclosed"}, "corrupt robret header"),
])
def test_bad_header_is_a_checkpoint_error(tmp_path, meta_change, match):
    tensors = {k: v.contiguous() for k, v in _encoder().net.state_dict().items()}
    meta = {"format": "robret-lipsim", "version": "1", "config": get_preset("cpu-tiny").to_json(), "preset": "x",
            "provenance": "{}", **meta_change}
    path = tmp_path / "hdr.safetensors"
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match=match):
        load_lipsim(path)
