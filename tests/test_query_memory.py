"""A large query reduced to the encoder's input before torch and FAISS load (`robret query`,
`retrieval.bulk.load_ahead`; issue 12, item 11's query memory target) gives the results of the full path:
the same input bit for bit, the same top-k, scores and radii; and within the float error of an independent
whole-image computation with torch's own resize kernel."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from encoder.preprocess import samples_to_input, to_input
from encoder.resize import banded
from index import Gallery
from retrieval.cli import main
from retrieval.search import search_embedding, search_image

ROOT = str(Path(__file__).resolve().parents[1])
pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = (1000, 1100)  # W × H: 1.1 megapixels, above encoder.resize.BAND_PIXELS (reduced in bands)


def _large_query(folder: Path, tmp_path: Path, mode: str, orientation: int = 1) -> Path:
    """A gallery photo enlarged to SIZE in `mode`, saved as PNG (with an EXIF orientation when > 1)."""
    photo = sorted(folder.iterdir())[0]
    image = Image.open(photo).convert("RGB").resize(SIZE, Image.BILINEAR).convert(mode)
    path = tmp_path / f"large-{mode}-{orientation}.png"
    kw = {}
    if orientation > 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    image.save(path, **kw)
    return path


@pytest.mark.parametrize("mode,orientation", [("RGB", 1), ("L", 1), ("RGBA", 6)])
def test_a_large_query_reduced_before_the_model_loads_gives_the_full_paths_top_k_scores_and_radii(
        photo_index, tiny_lipsim, tmp_path, capsys, mode, orientation):
    folder, index_dir = photo_index
    path = _large_query(folder, tmp_path, mode, orientation)
    code = main(["query", str(path), "--index-dir", str(index_dir), "-k", "5", "--certify-eps", "0.01", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["set_radius"] is not None
    assert doc["query_size"] == ([SIZE[0], SIZE[1]] if orientation == 6 else [SIZE[1], SIZE[0]])
    with Gallery.open(index_dir, encoder=tiny_lipsim) as g:
        full = search_image(g, path, k=5, eps=0.01).to_dict()  # decoded and preprocessed with the model loaded
        # The same numbers, exactly: same ids, scores, radii, certificate.
        for key in ("set_radius", "order_radius", "input_norm", "radius_space", "query_size", "values", "slack"):
            assert doc[key] == full[key], key
        assert [(h["id"], h["score"], h["radius"]) for h in doc["hits"]] == \
            [(h["id"], h["score"], h["radius"]) for h in full["hits"]]

        # An independent computation: the whole image's samples in float64, torch's resize kernel, then the
        # encoder. Its input differs by float rounding only (‖Δx‖ ~1e-6); each embedding is within the
        # encoder's float error ε of the exact one, so every score moves by ≤ L‖Δx‖ + 2ε and every radius
        # (a minimum of margins ⟨e, e_i − e_j⟩ over L‖e_i − e_j‖·‖P‖) by ≤ (L‖Δx‖ + 2ε)/(L‖P‖).
        decoded = g.decode(path).image
        from encoder.image import pixels

        px = pixels(decoded)
        assert banded(px.size)
        exact = samples_to_input(torch.from_numpy(px.samples).double()[None], px.layout, tiny_lipsim.input_size)
        reduced = to_input(decoded, tiny_lipsim.input_size)
        dx = float((reduced.double() - exact).norm())
        assert 0 < dx < 1e-4
        with torch.inference_mode():
            q = tiny_lipsim.embed(exact.float())[0].numpy()
        norm = tiny_lipsim.input_norm(px.size, px.layout)
        ref = search_embedding(g, q, 5, eps=0.01, input_norm=norm).to_dict()
        lip, eps_f = g.lipschitz, g.float_error
        assert [h["id"] for h in ref["hits"]] == [h["id"] for h in doc["hits"]]
        moved = lip * dx + 2 * eps_f
        for a, b in zip(doc["hits"], ref["hits"]):
            assert abs(a["score"] - b["score"]) <= moved
            assert abs(a["radius"] - b["radius"]) <= moved / (lip * norm)
        assert doc["input_norm"] == pytest.approx(norm, rel=1e-12)


def test_the_query_is_reduced_without_torch_or_faiss_and_to_the_full_paths_input_bit_for_bit(
        photo_index, tiny_lipsim, tmp_path):
    """In a fresh process, reading the first batch (`load_ahead`) imports neither torch nor FAISS and keeps no
    decoded image: only the (3, S, S) input, which equals the encoder's own preprocessing in that process
    exactly (and in this one to float32 rounding)."""
    folder, index_dir = photo_index
    path = _large_query(folder, tmp_path, "RGB")
    out, ref = tmp_path / "input.npy", tmp_path / "reference.npy"
    code = (
        "import sys, numpy as np\n"
        "from retrieval.bulk import QueryReader, expand_sources, load_ahead\n"
        f"reader = QueryReader.for_index({str(index_dir)!r})\n"
        f"[(q, digest)] = load_ahead(reader, expand_sources([{str(path)!r}]))\n"
        "assert 'torch' not in sys.modules and 'faiss' not in sys.modules, 'a library was loaded'\n"
        "assert q.pixels is None and reader.budget.used == 0\n"
        f"np.save({str(out)!r}, q.input)\n"
        # The encoder's own preprocessing in the same process: the same BLAS threads, so the same sums.
        "from PIL import Image\n"
        "from encoder.preprocess import to_input\n"
        f"with Image.open({str(path)!r}) as image:\n"
        f"    np.save({str(ref)!r}, to_input(image, {tiny_lipsim.input_size}).numpy()[0])\n"
        "print(q.size, q.layout, digest)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[-2:] == ["RGB", __import__("hashlib").sha256(path.read_bytes()).hexdigest()]
    early = np.load(out)
    assert early.shape == (3, tiny_lipsim.input_size, tiny_lipsim.input_size) and early.dtype == np.float32
    np.testing.assert_array_equal(early, np.load(ref))
    # Across processes the float32 products may be summed in another order (BLAS threads): equal to rounding.
    with Image.open(path) as image:
        np.testing.assert_allclose(early, to_input(image, tiny_lipsim.input_size)[0].numpy(), rtol=0, atol=2e-6)


def test_a_small_query_keeps_its_samples_for_the_encoder_and_a_foreign_input_size_is_refused(
        photo_index, tiny_lipsim, tmp_path):
    """Images at most BAND_PIXELS are preprocessed by the encoder itself (torch's kernel, as a gallery image);
    an input reduced for another input size is refused rather than embedded."""
    from retrieval.search import prepare_query, reduce_query

    folder, index_dir = photo_index
    small = Image.open(sorted(folder.iterdir())[0])
    kept = reduce_query(small, tiny_lipsim.input_size)
    assert kept.input is None and kept.pixels is not None
    with Gallery.open(index_dir, encoder=tiny_lipsim) as g:
        done = prepare_query(g, kept)
        assert done.pixels is None
        torch.testing.assert_close(done.input, to_input(small, tiny_lipsim.input_size), rtol=0, atol=0)
        large = Image.open(_large_query(folder, tmp_path, "RGB"))
        wrong = reduce_query(large, tiny_lipsim.input_size * 2)
        with pytest.raises(ValueError, match="input size"):
            prepare_query(g, wrong)


def test_reading_a_batch_ahead_decodes_large_files_within_the_readers_decode_budget(photo_index, tmp_path):
    """Four large files read ahead by four worker threads: each reserves its `decode_cost` from the reader's
    budget, so with room for one image at a time the most ever reserved is exactly one file's cost, and every
    file still comes back reduced (nothing refused for the budget)."""
    from encoder.image import decode_cost
    from retrieval.bulk import QueryReader, expand_sources, load_ahead

    folder, index_dir = photo_index
    files = [_large_query(folder, tmp_path, mode) for mode in ("RGB", "L", "RGBA", "LA")]
    costs = [decode_cost(p.read_bytes()) for p in files]
    reader = QueryReader.for_index(index_dir, decode_memory=int(1.5 * min(costs)))
    loaded = load_ahead(reader, expand_sources([str(p) for p in files]), workers=4)
    assert [q.layout for q, _ in loaded] == ["RGB", "L", "RGBA", "LA"]
    assert all(q.pixels is None and q.input.shape[0] == 3 for q, _ in loaded)
    assert reader.budget.used == 0 and reader.budget.peak == min(max(costs), reader.budget.max_bytes)
