"""robret.encoder: LipSim (1-Lipschitz perceptual metric), other backends, certificates.

    from encoder import load_metric
    model, preprocess = load_metric("lipsim:demo")
    d = model(preprocess(img_a), preprocess(img_b))     # cosine distance, shape (1,)
"""
from .certify import TopKCertificate, certify_ranked, certify_topk, pair_radius, twoafc_radius
from .checkpoint import CheckpointError, load_lipsim, save_lipsim
from .lipsim import LipSimEncoder, LipSimNet
from .presets import PRESETS, LipSimConfig, get_preset, list_presets
from .protocol import Encoder, EncoderError, TorchEncoder
from .registry import DEFAULT_ENCODER, list_encoders, load_encoder, load_metric, register_backend
from . import dreamsim_backend, pixels, standard  # noqa: F401 (they register their backends)

__all__ = [
    "CheckpointError", "DEFAULT_ENCODER", "Encoder", "EncoderError", "LipSimConfig", "LipSimEncoder",
    "LipSimNet", "PRESETS", "TopKCertificate", "TorchEncoder", "certify_ranked", "certify_topk",
    "get_preset", "list_encoders", "list_presets", "load_encoder", "load_lipsim", "load_metric",
    "pair_radius", "register_backend", "save_lipsim", "twoafc_radius",
]
