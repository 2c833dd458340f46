"""`robret encoder info SPEC` and `robret encoder list`."""
from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("encoder", help="inspect encoders", description="Inspect the encoders robret can load.")
    esub = p.add_subparsers(dest="encoder_command", metavar="ACTION", required=True)
    info = esub.add_parser("info", help="name, dimension, input size, Lipschitz bound, parameters",
                           description="Print an encoder's name, embedding dimension, input size, "
                           "Lipschitz bound (None when nothing is guaranteed) and parameter count.")
    info.add_argument("spec", help="encoder spec, e.g. lipsim:demo, lipsim:small, lipsim:FILE, pixels, "
                      "dreamsim:clip_vitb32")
    info.add_argument("--cache-dir", help="DreamSim weights directory (dreamsim: specs)")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_info)
    lst = esub.add_parser("list", help="list known encoder specs")
    lst.set_defaults(func=_list)


def _info(args) -> int:
    from encoder import load_encoder

    kwargs = {"cache_dir": args.cache_dir} if args.cache_dir else {}
    info = load_encoder(args.spec, **kwargs).info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        width = max(map(len, info))
        for k, v in info.items():
            if k == "parameters":
                v = f"{v:,} ({v / 1e6:.1f}M)"
            elif k == "lipschitz" and v is None:
                v = "None (no guarantee)"
            print(f"{k:<{width}}  {v}")
    return 0


def _list(args) -> int:
    from encoder import list_encoders

    for spec in list_encoders():
        print(spec)
    return 0
