"""robret.encoder: LipSim (1-Lipschitz perceptual metric), other backends, certificates.

    from encoder import load_metric
    model, preprocess = load_metric("lipsim:demo")
    d = model(preprocess(img_a), preprocess(img_b))     # cosine distance, shape (1,)
"""
from ._lazy import lazy_exports

# Public names → the submodule that defines them. They are imported on first use (PEP 562), so that
# `import encoder.io` or `from encoder import list_encoders` does not import torch and every backend:
# commands that need no model start fast (`robret encoder list`, `robret index stats`).
_EXPORTS = {
    "TopKCertificate": "certify", "certify_ranked": "certify", "certify_topk": "certify", "pair_radius": "certify",
    "twoafc_radius": "certify",
    "CheckpointError": "checkpoint", "load_lipsim": "checkpoint", "save_lipsim": "checkpoint",
    "LipSimEncoder": "lipsim", "LipSimNet": "lipsim",
    "PRESETS": "presets", "LipSimConfig": "presets", "get_preset": "presets", "list_presets": "presets",
    "Encoder": "protocol", "TorchEncoder": "protocol",
    "EncoderError": "errors",
    "DEFAULT_ENCODER": "registry", "list_encoders": "registry", "load_encoder": "registry", "load_metric": "registry",
    "register_backend": "registry",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
