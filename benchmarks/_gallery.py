"""The part of `index.Gallery` that `retrieval.search.search_embedding` uses, over a bare store: for
benchmarks that time the search path without a catalog (index_speed, gallery_certified). No project
imports, so a measuring child can load this file beside an older tree's code."""
from __future__ import annotations


class StoreGallery:
    """`search_embedding`'s view of a gallery: a store (VectorStore or MappedFlat), L = 1, no paths;
    certified inverted lists, int8 codes, M and the encoder's float error when given (defaults: none, the store's M,
    the gallery default)."""

    lipschitz = 1.0
    encoder_info = {"input_size": 64}

    quantized = None  # int8 codes (index.codes.QuantizedCodes), when given

    def __init__(self, store, certified_ivf=None, max_norm: float | None = None, float_error: float | None = None,
                 quantized=None):
        self.store, self.certified_ivf, self.float_error = store, certified_ivf, float_error
        if quantized is not None:
            self.quantized = quantized
        if max_norm is not None:
            self.max_norm = max_norm

    def __len__(self):
        return self.store.ntotal

    def search(self, q, k, exact=False):
        return self.store.search(q, k, exact=exact)

    def vectors(self, ids):
        return self.store.reconstruct(ids)

    def paths(self, ids):
        return [None] * len(ids)
