"""robret's Streamlit page: search a gallery with LipSim and a comparison encoder, attack the query,
and see what moved and what the certificate guaranteed.

Run with `robret ui` (settings in ROBRET_UI_* variables, see ui/config.py). Models and indexes are
loaded once per process (st.cache_resource, shared by every browser session); everything about one
user's query and attack lives in st.session_state.
"""
from __future__ import annotations

import json
import logging
import random
import sys
import time
from pathlib import Path

try:
    import ui  # noqa: F401  (installed with the package)
except ModuleNotFoundError:  # run from a source tree that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streamlit as st

from encoder.image import lossless_file
from ui.config import UIConfig
from ui.engine import ATTACK_KINDS, AttackSpec, Engine, attack_report, ranking_rows
from ui.query import Query, UploadError, decode_upload, display_rgb, png_bytes, query_pixels, to_pil
from ui.render import CSS, cards_html, data_uri, fmt_radius, fmt_rank, magnified_perturbation, md_escape

log = logging.getLogger("ui.app")

st.set_page_config(page_title="robret — certified retrieval under attack", page_icon="🛡", layout="wide")
st.markdown(CSS, unsafe_allow_html=True)

UPLOAD_TYPES = ["png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff"]


@st.cache_resource(show_spinner="Loading the encoders and the index (once per server)…")
def get_engine(cfg: UIConfig) -> Engine:
    return Engine(cfg)


def fail(what: str, exc: BaseException) -> None:
    """Show an error as a message (the trace goes to the server log only)."""
    log.exception("%s", what)
    st.error(md_escape(f"{what}: {exc}"))


cfg = UIConfig.from_env()
try:
    engine = get_engine(cfg)
except Exception as exc:  # noqa: BLE001 - shown to the user, logged with its trace
    fail("Cannot open the gallery", exc)
    st.stop()

state = st.session_state
N = len(engine.gallery)
if N < 2:
    st.error(f"The gallery {md_escape(engine.index_dir)} holds {N} image(s): searching needs at least 2.")
    st.stop()
names = engine.names


def thumb(item_id: int) -> str:
    return data_uri(engine.thumbnail(item_id))


# ---- sidebar: what is loaded ------------------------------------------------------------------------
with st.sidebar:
    st.header("Gallery")
    st.write(f"**{N}** images · `{engine.index_dir}`")
    st.header("Encoders")
    for enc in (engine.lipsim.encoder, engine.compare.encoder):
        bound = ("no Lipschitz bound: no certificate" if enc.lipschitz is None else
                 f"Lipschitz bound L = {enc.lipschitz:g}: results carry certified radii")
        st.markdown(f"**{md_escape(enc.name)}** — {enc.dim}-d, {enc.input_size} px input, {bound}")
    for note in engine.notes:
        st.warning(note)
    k = st.slider("k (results per encoder)", 1, max(2, min(10, N - 1)), max(1, min(5, N - 1)), key="k")
    st.caption(f"Loaded in {engine.load_seconds:.1f} s (once per server). Radii, ε and ‖δ‖ are ℓ2/ℓ∞ norms "
               "over the query file's own samples in [0,1] units, at its full size — the radius `robret query` "
               "states — and, in brackets, the RMS change per sample in 1/255. Attacks search on a copy with "
               f"longest side ≤ {cfg.work_side} px for speed; their outcome is measured on the full image.")

st.title("robret — certified image retrieval under attack")
st.caption(f"Search the gallery with **{md_escape(engine.lipsim.label)}** and "
           f"**{md_escape(engine.compare.label)}** side by side; then attack the query and see which top-k moves "
           "and what LipSim's certificate guaranteed.")


# ---- 1. query ----------------------------------------------------------------------------------------
def use_query(label: str, load, gallery_id: int | None = None, key: str | None = None) -> None:
    """Make `label` the session's query; `load()` gives its PIL image (decoded only when `key`, default the label,
    changes: an upload's key also holds its file id, so that two uploads of one name are two queries)."""
    key = label if key is None else key
    if state.get("query_key") == key:
        return
    q = query_pixels(load())
    shown = png_bytes(to_pil(display_rgb(q.x, q.layout, cfg.work_side)))
    state.query = Query(q.x, label, q.original_hw, gallery_id, shown, q.layout, q.space)
    state.query_key = key
    state.pop("attack", None)


def forget_query() -> None:
    for key in ("query", "query_key", "attack"):
        state.pop(key, None)


def pick_random() -> None:
    state.gallery_filter = ""
    state.gallery_pick = random.choice([g.id for g in engine.gallery])


st.subheader("1 · Query")
source = st.radio("Query from", ["the gallery", "an upload"], horizontal=True, key="source")
qcol, qimg = st.columns([3, 1])
with qcol:
    if source == "the gallery":
        c1, c2 = st.columns([3, 1])
        flt = c1.text_input("Search the gallery by name", key="gallery_filter", placeholder="e.g. coffee")
        c2.button("Random", on_click=pick_random, key="random", width="stretch")
        matches = [g.id for g in engine.gallery if flt.lower() in g.name.lower()]
        options = matches[: cfg.max_options]
        if len(matches) > len(options):
            st.caption(f"{len(matches)} names match: the first {len(options)} are listed; type more to narrow.")
        if not options:
            st.info(f"No gallery image name contains “{flt}”.")
        else:
            if state.get("gallery_pick") not in options:
                state.gallery_pick = options[0]
            pick = st.selectbox(f"Gallery image ({len(matches)} of {N})", options, key="gallery_pick",
                                format_func=names.get)
            try:
                use_query(f"gallery: {names[pick]}", lambda: engine.image(pick), pick)
            except Exception as exc:  # noqa: BLE001 - a gallery file changed or vanished since indexing
                forget_query()
                fail(f"Cannot read gallery image {names[pick]}", exc)
    else:
        up = st.file_uploader(f"Upload an image (≤ {cfg.max_upload_mb} MB, ≤ {cfg.max_pixels / 1e6:.0f} MP)",
                              type=UPLOAD_TYPES, key="upload")
        if up is None:
            st.info("Choose an image file to use as the query.")
        else:
            try:
                use_query(f"upload: {up.name}",
                          lambda: decode_upload(up.getvalue(), up.name, cfg.max_upload_mb * 2**20, cfg.max_pixels),
                          key=f"upload: {up.name} ({up.file_id})")
            except UploadError as exc:
                forget_query()
                st.error(md_escape(str(exc)))

query: Query | None = state.get("query")
if query is not None and source == "an upload" and not str(query.label).startswith("upload:"):
    query = None
if query is not None and source == "the gallery" and query.gallery_id is None:
    query = None
if query is None:
    st.stop()

with qimg:
    st.image(query.png, caption=f"{query.label} · "
             f"{query.original_hw[1]}×{query.original_hw[0]} px · {query.layout}", width=200)


# ---- 2. top-k ----------------------------------------------------------------------------------------
search_key = (state.query_key, k)
if state.get("search_key") != search_key:
    try:
        t0 = time.perf_counter()
        state.rankings = engine.search(query.x, k, layout=query.layout)
        state.search_seconds = time.perf_counter() - t0
        state.search_key = search_key
    except Exception as exc:  # noqa: BLE001
        fail("Search failed", exc)
        st.stop()
rankings = state.rankings


def query_rms255(l2: float | None) -> float | None:
    """An ℓ2 norm over the query's samples as the RMS change per sample in 1/255 (ℓ2/√(C·H·W)·255)."""
    return None if l2 is None else l2 / query.x.numel() ** 0.5 * 255


def side_cards(side, ranking, before=None, target=None) -> str:
    rows = []
    for row in ranking_rows(engine, ranking):
        r = {**row, "thumb": thumb(row["id"]), "target": row["id"] == target}
        if side.certified:
            r["radius"] = row.get("radius")
        if before is not None:
            rb = before.rank_of(row["id"])
            if rb is None or rb > before.k:
                r["new"] = True
                r["move"] = ("new", f"new (was {fmt_rank(rb, len(before.ids))})")
            elif rb != row["rank"]:
                r["move"] = ("up" if rb > row["rank"] else "down", f"moved #{rb} → #{row['rank']}")
        rows.append(r)
    return cards_html(rows)


def set_badge(side, ranking) -> str:
    if not side.certified:
        return '<span class="rr-nosetbadge">no certificate</span>'
    return (f'<span class="rr-setbadge">top-{ranking.k} set certified for ‖δ‖₂ &lt; '
            f'{fmt_radius(ranking.set_radius)} ({fmt_radius(query_rms255(ranking.set_radius))}/255 RMS per sample)</span>')


st.subheader(f"2 · Top-{k}")
cols = st.columns(2)
for col, side in zip(cols, engine.sides):
    rk = rankings[side.key]
    with col:
        st.markdown(f"#### {md_escape(side.label)}")
        st.markdown(set_badge(side, rk), unsafe_allow_html=True)
        st.markdown(side_cards(side, rk), unsafe_allow_html=True)
        with st.expander("as a table"):
            st.dataframe(ranking_rows(engine, rk), hide_index=True, width="stretch", key=f"table_{side.key}")
st.caption(f"Search (embed + search + certify, both encoders): {state.search_seconds * 1000:.0f} ms")


# ---- 3. attack ---------------------------------------------------------------------------------------
st.subheader("3 · Attack the query")
a1, a2, a3, a4 = st.columns([3, 1, 1, 1])
kind = a1.radio("Attack", list(ATTACK_KINDS), format_func=ATTACK_KINDS.get, key="attack_kind")
norm = a2.radio("Norm", ["l2", "linf"], format_func={"l2": "ℓ2", "linf": "ℓ∞"}.get, key="attack_norm")
if norm == "l2":
    eps = a3.number_input("ε (ℓ2)", min_value=0.0, max_value=1000.0, value=0.5, step=0.05, format="%.3f",
                          key="eps_l2")
else:
    eps = a3.number_input("ε (ℓ∞, in 1/255)", min_value=0.0, max_value=64.0, value=8.0, step=1.0,
                          key="eps_linf") / 255
steps = a4.number_input("steps", min_value=1, max_value=cfg.max_steps, value=20, step=5, key="attack_steps")
if norm == "l2":
    a3.caption(f"= {query_rms255(eps):.3g}/255 RMS per sample")
target = None
if kind == "targeted":
    candidates = [g.id for g in engine.gallery if g.id not in rankings["lipsim"].top] or [g.id for g in engine.gallery]
    target = st.selectbox("Target: the gallery image to pull into the top-k", candidates,
                          format_func=names.get, key="attack_target")

if st.button("Run the attack on both encoders", type="primary", key="run_attack"):
    bar = st.progress(0.0, text="starting…")
    try:
        spec = AttackSpec(kind=kind, norm=norm, eps=float(eps), steps=int(steps), k=k, target_id=target)
        t0 = time.perf_counter()
        results = engine.attack(query.x, spec, layout=query.layout, space=query.space,
                                progress=lambda f, text: bar.progress(min(f, 1.0), text=text))
        seconds = time.perf_counter() - t0
        report = attack_report(engine, query.label, query.original_hw, query.space, spec, results)
        report["seconds"] = seconds
        images = {}
        clean_shown = display_rgb(query.x, query.layout, cfg.work_side)
        for key, res in results.items():  # encoded once, not on every rerun
            adv_shown = display_rgb(res.x_adv, query.layout, cfg.work_side)
            mag, m = magnified_perturbation(adv_shown - clean_shown)
            images[key] = (png_bytes(to_pil(adv_shown)), png_bytes(to_pil(mag)), m,
                           lossless_file(to_pil(res.x_adv, query.layout)))  # (PNG; TIFF for CMYK, YCbCr)
        state.attack = {"spec": spec, "results": results, "report": report, "seconds": seconds, "images": images}
    except Exception as exc:  # noqa: BLE001
        fail("The attack failed", exc)
    bar.empty()

att = state.get("attack")
if att is not None:
    spec, results = att["spec"], att["results"]
    st.caption(f"{ATTACK_KINDS[spec.kind]} · {'ℓ2' if spec.norm == 'l2' else 'ℓ∞'} ε = {spec.eps:.4g} · "
               f"{spec.steps} steps · k = {spec.k} · {att['seconds']:.1f} s for both encoders")
    for side in engine.sides:
        res = results[side.key]
        st.markdown(f"#### {md_escape(res.label)}")
        c1, c2, c3, c4 = st.columns([1, 1, 1, 2])
        adv_png, mag_png, m, (adv_full, adv_suffix, adv_mime) = att["images"][side.key]
        c1.image(query.png, caption="clean query", width="stretch")
        c2.image(adv_png, caption="adversarial query", width="stretch")
        c3.image(mag_png, caption=f"perturbation ×{m:.0f} (grey = 0)", width="stretch")
        with c4:
            m1, m2, m3 = st.columns(3)
            m1.metric(f"overlap@{spec.k}", f"{res.overlap:.0%}")
            m2.metric("‖δ‖₂", f"{res.delta_l2:.4f}", help=f"{query_rms255(res.delta_l2):.3g}/255 RMS per sample")
            m3.metric("‖δ‖∞ × 255", f"{res.delta_linf * 255:.2f}")
            if res.target_rank is not None:
                b, a = res.target_rank
                st.markdown(f"target {md_escape(engine.name_of(spec.target_id))}: "
                            f"{fmt_rank(b, len(res.before.ids))} → {fmt_rank(a, len(res.after.ids))}")
            cert = res.certificate
            if cert is None:
                st.info(f"{res.label} has no Lipschitz bound: nothing was guaranteed.")
            elif not cert["ok"]:
                st.error(f"Certificate {cert['verdict']} (set radius {fmt_radius(cert['set_radius'])} = "
                         f"{fmt_radius(query_rms255(cert['set_radius']))}/255 RMS, "
                         f"‖δ‖₂ = {cert['delta_l2']:.4f})")
            elif cert["within_radius"]:
                st.success(f"Certificate {cert['verdict']} (‖δ‖₂ = {cert['delta_l2']:.4f} < "
                           f"{fmt_radius(cert['set_radius'])} = {fmt_radius(query_rms255(cert['set_radius']))}/255 RMS)")
            else:
                st.info(f"Certificate {cert['verdict']} (‖δ‖₂ = {cert['delta_l2']:.4f} ≥ set radius "
                        f"{fmt_radius(cert['set_radius'])} = {fmt_radius(query_rms255(cert['set_radius']))}/255 RMS)")
            st.download_button(f"Download the adversarial image ({adv_suffix[1:].upper()})", adv_full,
                               file_name=f"adversarial-{side.key}{adv_suffix}", mime=adv_mime, key=f"dl_{side.key}")
        b1, b2 = st.columns(2)
        with b1:
            st.markdown("before")
            st.markdown(side_cards(side, res.before, target=spec.target_id), unsafe_allow_html=True)
        with b2:
            st.markdown("after")
            st.markdown(side_cards(side, res.after, before=res.before, target=spec.target_id),
                        unsafe_allow_html=True)
        moves = [{"name": engine.name_of(mv["id"]), "before": fmt_rank(mv["before"], len(res.before.ids)),
                  "after": fmt_rank(mv["after"], len(res.after.ids))} for mv in res.moves()]
        with st.expander(f"rank moves ({res.label})"):
            st.dataframe(moves, hide_index=True, width="stretch", key=f"moves_{side.key}")
    st.download_button("Download the JSON report", json.dumps(att["report"], indent=2, default=float).encode(),
                       file_name="robret-attack-report.json", mime="application/json", key="dl_report")
