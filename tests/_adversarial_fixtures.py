"""Shared data for the adversarial-retrieval tests: small, built once per process."""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def small_benchmark(size: int = 32):
    """The held-out benchmark at its CI size, original family only (mild edits of aligned crops): 16
    queries, 24 gallery items (8 distractors)."""
    from retrieval.bench_data import heldout_benchmark

    return heldout_benchmark(size, crops_per_photo=2, distractors_per_photo=1, seed=0, families=("edits",))


@functools.lru_cache(maxsize=None)
def encoder(spec: str):
    from encoder import load_encoder

    return load_encoder(spec)


@functools.lru_cache(maxsize=None)
def gallery_embeddings(spec: str, size: int = 32) -> torch.Tensor:
    from retrieval.attacks import ImageEmbedder

    return ImageEmbedder(encoder(spec)).embed(small_benchmark(size).gallery)
