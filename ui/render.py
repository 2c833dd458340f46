"""HTML for the page's thumbnail cards and small helpers to show tensors. Text is always escaped."""
from __future__ import annotations

import base64
import html

import torch

__all__ = ["CSS", "cards_html", "data_uri", "magnified_perturbation", "fmt_radius", "fmt_rank", "md_escape"]

CSS = """
<style>
.rr-grid{display:flex;flex-wrap:wrap;gap:8px;margin:4px 0 10px 0}
.rr-card{width:118px;border:1px solid rgba(128,128,128,.35);border-radius:6px;padding:4px;font-size:12px;
  line-height:1.25;background:rgba(128,128,128,.04)}
.rr-card img{width:108px;height:108px;object-fit:cover;border-radius:4px;display:block;margin:0 auto 3px auto}
.rr-card.rr-new{border:2px solid #d9480f}
.rr-card.rr-target{box-shadow:0 0 0 2px #7048e8}
.rr-name{font-weight:600;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.rr-badge{display:inline-block;border-radius:9px;padding:0 6px;margin-top:2px;font-size:11px}
.rr-cert{background:#d3f9d8;color:#1b5e20}
.rr-nocert{background:#eee;color:#555}
.rr-move-up{color:#2b8a3e}.rr-move-down{color:#c92a2a}.rr-move-new{color:#d9480f;font-weight:600}
.rr-setbadge{display:inline-block;background:#1b5e20;color:white;border-radius:10px;padding:1px 9px;font-size:13px}
.rr-nosetbadge{display:inline-block;background:#868e96;color:white;border-radius:10px;padding:1px 9px;font-size:13px}
</style>
"""


def md_escape(text: str) -> str:
    """Text (file names, error messages) shown inside Streamlit markdown, its markup characters escaped."""
    return "".join("\\" + ch if ch in "\\`*_[]<>#|~$" else ch for ch in str(text))


def data_uri(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def fmt_radius(r: float | None) -> str:
    if r is None:
        return "—"
    return "∞" if r == float("inf") else f"{r:.4f}"


def fmt_rank(rank: int | None, depth: int) -> str:
    return f"#{rank}" if rank is not None else f"below #{depth}"


def cards_html(rows: list[dict]) -> str:
    """rows: dicts with rank, name, score, thumb (data URI), and optional radius, move, new, target."""
    out = ['<div class="rr-grid">']
    for r in rows:
        cls = "rr-card" + (" rr-new" if r.get("new") else "") + (" rr-target" if r.get("target") else "")
        parts = [f'<div class="{cls}">', f'<img src="{r["thumb"]}" alt="">',
                 f'<div class="rr-name" title="{html.escape(r["name"])}">#{r["rank"]} {html.escape(r["name"])}</div>',
                 f'<div>score {r["score"]:.4f}</div>']
        if "radius" in r:
            if r["radius"] is None:
                parts.append('<span class="rr-badge rr-nocert">no certificate</span>')
            else:
                parts.append(f'<span class="rr-badge rr-cert" title="stays in the top-k for any perturbation '
                             f'with ℓ2 norm below this">certified r = {fmt_radius(r["radius"])}</span>')
        if r.get("move"):
            kind, text = r["move"]
            parts.append(f'<div class="rr-move-{kind}">{html.escape(text)}</div>')
        parts.append("</div>")
        out.append("".join(parts))
    out.append("</div>")
    return "".join(out)


def magnified_perturbation(delta: torch.Tensor) -> tuple[torch.Tensor, float]:
    """δ (3, H, W) → (0.5 + δ·m/2 in [0, 1], m) with m = 1/max|δ|: zero is mid-grey."""
    peak = float(delta.abs().max())
    m = 1.0 / peak if peak > 0 else 1.0
    return (0.5 + 0.5 * delta * m).clamp(0, 1), m
