"""robret.index: the gallery — FAISS on the unit sphere, a SQLAlchemy catalog, folder ingestion.

Building and refreshing (library form of `robret index build/update/repair/verify/stats`):

    from index import build_index, update_index, repair_index, verify_index, index_stats, IngestOptions
    report = build_index("photos/", "photos-index/", "lipsim:demo",        # encoder spec, recorded
                         options=IngestOptions(batch_size=32, workers=4))
    report = update_index("photos-index/")       # re-scan the recorded folder: new, changed, renamed, gone
    assert verify_index("photos-index/").ok      # catalog and index file agree (ids, counts, norms, version)

Reading — `Gallery` is the one object the CLI, the UI and the attacks use:

    from index import Gallery
    g = Gallery.open("photos-index/")            # read-only; maps or loads the index files, not yet the encoder
    len(g), g.dim, g.version, g.encoder_spec, g.lipschitz, g.root
    g.encoder                                    # the Encoder that built it (lazy; weights checked)
    q = g.embed_images([pil_image])              # (n, dim) unit-norm float32, same preprocessing as the gallery
    scores, ids = g.search(q, k=10)              # (n, k) float32 cosine similarities, (n, k) int64 ids (−1 = none)
    scores, ids = g.search(q, k=10, exact=True)  # exhaustive even on IVF/HNSW (what certificates need)
    g.vectors(ids[0])                            # (k, dim) stored vectors, reconstructed exactly
    all_ids, all_vecs = g.all_vectors()          # the whole gallery, e.g. for attacks
    g.paths(ids[0])                              # absolute Paths (None for −1); g.path(id) for one
    g.records(ids[0])                            # catalog rows: path, size, width, height, content_hash, notes…
    g.decode("query.jpg")                        # hardened decode: DecodedImage or DecodeError(kind, reason)
    g.image(id)                                  # a gallery file as indexed (inside the root, same content
                                                 # hash) or DecodeError (kind "changed": changed since indexed)

Certified search lives in retrieval/search.py (it combines a Gallery with encoder.certify):

    from retrieval.search import search_image, search_embedding
    res = search_image(g, "query.jpg", k=10, eps=0.05)
    res.hits[i].rank/.id/.score/.path/.radius    # radius: ℓ2 in the query image's own [0,1] pixels
    res.set_radius, res.order_radius, res.eps_certified, res.to_dict()
    res = search_embedding(g, q[0], k=10)        # from an embedding; radii at the encoder's input
                                                 # (pass input_norm= to state them for an image)

Ids are stable 64-bit integers: a file keeps its id while it exists (a change re-embeds it under the
same id; a rename moves the row and keeps the id); a removed file's id is never reused. Errors are
typed (index.errors): CatalogError, SchemaVersionError, EncoderMismatchError, StoreError,
IndexLockedError, FolderError, IntegrityError (a StoreError), all GalleryError (a RuntimeError); decode failures are DecodeError.
"""
from encoder._lazy import lazy_exports

# Public names → the submodule that defines them, imported on first use (PEP 562): `index stats` reads
# the catalog without importing FAISS or torch, `index verify` without torch.
_EXPORTS = {
    **dict.fromkeys(["FAILED", "INDEXED", "REMOVED", "SCHEMA_VERSION", "Catalog", "FileRecord", "record_dict"],
                     "catalog"),
    **dict.fromkeys(["DecodedImage", "DecodeError", "DecodeLimits", "read_image"], "decode"),
    **dict.fromkeys(["CatalogError", "EncoderMismatchError", "FolderError", "GalleryError", "IndexLockedError",
                     "IntegrityError", "SchemaVersionError", "StoreError"], "errors"),
    **dict.fromkeys(["Gallery", "open_gallery"], "gallery"),
    **dict.fromkeys(["IngestOptions", "IngestReport", "build_index", "build_cache_index", "repair_index",
                     "update_index"], "ingest"),
    "VectorStore": "store",
    **dict.fromkeys(["VerifyReport", "verify_index"], "verify"),
    "index_stats": "stats",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
