"""`robret weights list|fetch|import`: the pretrained weights (encoder.pretrained) and their cache (encoder.fetch)."""
from __future__ import annotations

import json

_CACHE_HELP = ("weights cache root (default: $ROBRET_WEIGHTS_DIR, else the user cache directory, "
               "~/.cache/robret on Linux); DreamSim files go to ROOT/dreamsim")


def register(sub) -> None:
    p = sub.add_parser("weights", help="list, fetch and import pretrained weights",
                       description="Pretrained weights: the official LipSim checkpoints and every DreamSim variant. "
                       "They are downloaded only by `robret weights fetch`, verified, and installed in the "
                       "weights cache, from which `lipsim:official-*` and `dreamsim:*` load.")
    wsub = p.add_subparsers(dest="weights_command", metavar="ACTION", required=True)

    lst = wsub.add_parser("list", help="every known weight: cached or not, size, path, source",
                          description="Downloadable weights (cached or not, size, path, SHA-256, whether they "
                          "contain code), bundled trained models, and random-weight presets (shapes only).")
    lst.add_argument("--json", action="store_true", help="print JSON")
    lst.add_argument("--cache-dir", help=_CACHE_HELP)
    lst.set_defaults(func=_list)

    fetch = wsub.add_parser("fetch", help="download, verify and install weights",
                            description="Download SPEC's files (resuming an interrupted download), check size, "
                            "SHA-256 and format, then install them (official LipSim .pth converted to "
                            "safetensors; DreamSim zips unpacked). Nothing is installed unless every check passes.")
    fetch.add_argument("specs", nargs="+", metavar="SPEC", help="e.g. lipsim:official-m0.5 dreamsim:ensemble")
    fetch.add_argument("--mirror", metavar="URL", help="fetch URL/<file name> instead of the upstream sources "
                       "(default: $ROBRET_WEIGHTS_MIRROR); file names as `robret weights list` shows them")
    fetch.add_argument("--cache-dir", help=_CACHE_HELP)
    fetch.add_argument("--force", action="store_true", help="download again even when installed")
    fetch.add_argument("--quiet", action="store_true", help="no progress bar")
    fetch.set_defaults(func=_fetch)

    imp = wsub.add_parser("import", help="install weights obtained elsewhere, with the same checks",
                          description="Install SPEC from a file (the official .pth, a DreamSim release zip, …) or "
                          "a folder holding its files under the names `robret weights list` shows.")
    imp.add_argument("spec", metavar="SPEC")
    imp.add_argument("source", metavar="FILE|DIR")
    imp.add_argument("--cache-dir", help=_CACHE_HELP)
    imp.set_defaults(func=_import)


def _size(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def _rows(cache_dir) -> dict:
    from encoder.installed import weight_status
    from encoder.presets import PRESETS
    from encoder.pretrained import list_pretrained
    from encoder.registry import bundled_weights

    downloadable = []
    for entry in list_pretrained():
        st = weight_status(entry.spec, cache_dir)
        downloadable.append({
            "spec": entry.spec, "cached": st.cached, "size": st.size, "path": str(st.path),
            "contains_code": st.contains_code, "description": entry.description,
            "files": [{"name": f.name, "source": f.source, "size": f.size, "sha256": st.sha256[f.name],
                       "sha256_published": f.sha256 is not None, "commit": f.commit} for f in entry.files],
            "licence": entry.licence, "citation": entry.citation,
        })
    bundled = [{"spec": f"{prefix}:{name}", "path": str(path), "size": path.stat().st_size}
               for prefix in ("lipsim", "standard", "robdml") for name, path in bundled_weights(prefix).items()]
    presets = [{"spec": f"lipsim:{name}", "parameters": cfg.num_params()} for name, cfg in PRESETS.items()]
    return {"downloadable": downloadable, "bundled": bundled, "random_weight_presets": presets}


def _list(args) -> int:
    from encoder.pretrained import weights_root

    rows = _rows(args.cache_dir)
    if args.json:
        print(json.dumps({"cache_root": str(weights_root(args.cache_dir)[0]), **rows}, indent=2))
        return 0
    root, source = weights_root(args.cache_dir)
    print(f"Downloadable (cache root {root}, from {source}; `robret weights fetch SPEC`):")
    width = max(len(r["spec"]) for r in rows["downloadable"])
    for r in rows["downloadable"]:
        state = "cached" if r["cached"] else "-"
        code = "  [contains code: torch.hub repository, pinned]" if r["contains_code"] else ""
        print(f"  {r['spec']:<{width}}  {state:<6}  {_size(r['size']):>9}  {r['path'] if r['cached'] else ''}{code}")
        for f in r["files"]:
            sha = f["sha256"] or "unknown until fetched"
            note = "" if f["sha256_published"] or not f["sha256"] else " (recorded at fetch)"
            print(f"      {f['name']}  sha256 {sha}{note}")
    print("Bundled trained models (installed with robret):")
    for r in rows["bundled"]:
        print(f"  {r['spec']:<{width}}  {_size(r['size']):>9}  {r['path']}")
    print("Random-weight presets (shapes only, not trained: timing and tests):")
    for r in rows["random_weight_presets"]:
        print(f"  {r['spec']:<{width}}  {r['parameters'] / 1e6:.1f}M parameters")
    return 0


def _fetch(args) -> int:
    from encoder.fetch import fetch, weight_status

    for spec in args.specs:
        path = fetch(spec, cache_dir=args.cache_dir, mirror=args.mirror, progress=not args.quiet, force=args.force)
        st = weight_status(spec, args.cache_dir)
        print(f"{spec}: installed in {path} ({_size(st.size)})")
    return 0


def _import(args) -> int:
    from encoder.fetch import import_weights, weight_status

    path = import_weights(args.spec, args.source, cache_dir=args.cache_dir)
    st = weight_status(args.spec, args.cache_dir)
    if st.cached:
        print(f"{args.spec}: installed in {path} ({_size(st.size)})")
        return 0
    print(f"{args.spec}: files imported into {path}; still incomplete (see `robret weights list`)")
    return 1
