"""The gallery's only contact with encoder/: load by spec, identify, embed batches.

Everything here goes through `encoder.load_encoder` and the Encoder protocol (embed, preprocess,
name, dim, input_size, lipschitz), so any registered backend can fill a gallery.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

__all__ = ["load", "canonical_spec", "identity", "weights_fingerprint", "embed_inputs", "pick_device"]


def pick_device(force_cpu: bool = False) -> str:
    return "cuda" if (not force_cpu and torch.cuda.is_available()) else "cpu"


def load(spec: str, device: str = "cpu"):
    """`encoder.load_encoder(spec)`, with a clearer message when the default demo model is absent."""
    from encoder import DEFAULT_ENCODER, load_encoder

    try:
        return load_encoder(spec, device=device)
    except ValueError as exc:
        if spec == DEFAULT_ENCODER:
            raise ValueError(f"the default encoder {spec!r} is not available in this installation "
                             f"(its checkpoint is not bundled); pass --encoder with another spec. {exc}") from None
        raise


def canonical_spec(spec: str) -> str:
    """`spec` as recorded in an index: a checkpoint given by a relative path (`lipsim:FILE`) becomes
    absolute, so that updates and queries from any directory load the same file. Registry names
    (bundled models, presets) take precedence over files, as in `encoder.load_encoder`."""
    from encoder import list_encoders

    prefix, sep, arg = spec.partition(":")
    if not sep or not arg or spec in list_encoders():
        return spec
    path = os.path.expanduser(arg)
    return f"{prefix}:{os.path.abspath(path)}" if os.path.exists(path) else spec


def weights_fingerprint(encoder) -> str | None:
    """SHA-256 over the encoder's state dict (names, dtypes, shapes, values); None without one."""
    state_dict = getattr(encoder, "state_dict", None)
    if state_dict is None:
        return None
    h = hashlib.sha256()
    for name, tensor in sorted(state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def identity(encoder, spec: str) -> dict:
    """What the catalog records about an encoder, and what `check_same_encoder` compares."""
    return {
        "spec": spec,
        "name": encoder.name,
        "dim": int(encoder.dim),
        "input_size": int(encoder.input_size),
        "lipschitz": None if encoder.lipschitz is None else float(encoder.lipschitz),
        "fingerprint": weights_fingerprint(encoder),
    }


@torch.inference_mode()
def embed_inputs(encoder, inputs: list[torch.Tensor]) -> np.ndarray:
    """Preprocessed inputs [(1, 3, S, S), …] → unit-norm float32 (B, dim) embeddings."""
    x = torch.cat(inputs, dim=0)
    return encoder.embed(x).detach().to("cpu", torch.float32).numpy()
