"""Training: LipSim distillation (stage 1), 2AFC hinge fine-tuning (stage 2), the contrastive
standard baseline, and the reproducible offline demo (`encoder.train.demo`)."""
from .contrastive import ContrastiveConfig, nt_xent, train_contrastive
from .distill import (DistillConfig, EncoderTeacher, PrecomputedTeacher, center_view, compute_teacher_embeddings,
                      distill)
from .finetune import FinetuneConfig, finetune, hinge_2afc_loss
from .schedules import cosine_with_warmup, triangular

__all__ = [
    "ContrastiveConfig", "DistillConfig", "EncoderTeacher", "FinetuneConfig", "PrecomputedTeacher", "center_view",
    "compute_teacher_embeddings", "cosine_with_warmup", "distill", "finetune", "hinge_2afc_loss", "nt_xent",
    "train_contrastive", "triangular",
]
