"""`robret ui`: serve the Streamlit page (ui/app.py) on 127.0.0.1.

The page reads its settings from environment variables (ROBRET_UI_*, see ui/config.py), so the same
script runs under `streamlit run`, under this command and under streamlit's AppTest.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("ui", help="serve the Streamlit page (search, certificates, attacks)",
                       description="Serve the Streamlit page: search an index with LipSim and a comparison "
                       "encoder side by side, attack the query and see what changed and what was certified. "
                       "Without --index-dir, a demo index of the bundled sample photos is built (or reused) "
                       "in a cache directory.")
    p.add_argument("--index-dir", help="a LipSim index built by `robret index build` (default: the demo index)")
    p.add_argument("--compare", default=None,
                   help="comparison encoder spec, or an index directory of the same folder (default: "
                   "dreamsim:ensemble when its weights are available, else standard:demo; robdml:demo shows the "
                   "empirically defended CNN)")
    p.add_argument("--cache-dir", default=None,
                   help="where the demo index and comparison indexes live (default $ROBRET_CACHE or "
                   "~/.cache/robret)")
    p.add_argument("--address", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8501, help="port (default 8501; 0: a free one, printed)")
    p.add_argument("--max-upload-mb", type=int, default=None, help="largest upload accepted, in MB (default 8)")
    p.set_defaults(func=run)


def streamlit_command(args) -> tuple[list[str], dict[str, str]]:
    """The `streamlit run` command line and environment that serve the page for `args`."""
    from ui.config import ENV_PREFIX, UIConfig

    cfg = UIConfig.from_env()
    if args.max_upload_mb is not None:
        if args.max_upload_mb < 1:
            raise ValueError("--max-upload-mb must be at least 1")
        cfg = cfg.replace(max_upload_mb=args.max_upload_mb)
    if args.index_dir is not None:
        index_dir = Path(args.index_dir).expanduser()
        if not index_dir.is_dir():
            raise FileNotFoundError(f"--index-dir {index_dir}: no such directory (build one with "
                                    "`robret index build FOLDER --index-dir DIR`)")
        cfg = cfg.replace(index_dir=str(index_dir.resolve()))
    if args.compare is not None:
        compare = Path(args.compare).expanduser()
        cfg = cfg.replace(compare=str(compare.resolve()) if compare.is_dir() else args.compare)
    if args.cache_dir is not None:
        cfg = cfg.replace(cache_dir=str(Path(args.cache_dir).expanduser().resolve()))
    app = Path(__file__).resolve().parents[2] / "ui" / "app.py"
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(app),
        "--server.address", args.address,
        "--server.port", str(args.port),
        "--server.headless", "true",
        "--server.maxUploadSize", str(cfg.max_upload_mb),
        "--server.fileWatcherType", "none",
        "--server.runOnSave", "false",
        "--browser.gatherUsageStats", "false",
        "--global.developmentMode", "false",
        "--client.toolbarMode", "minimal",
    ]
    env = dict(os.environ)
    env.update({f"{ENV_PREFIX}{k.upper()}": str(v) for k, v in cfg.to_env().items()})
    return cmd, env


def run(args) -> int:
    from .serve_cmd import listen

    with listen(args.address, args.port) as sock:  # a port in use said now; port 0: a free one, then given to streamlit
        args.port = sock.getsockname()[1]
    cmd, env = streamlit_command(args)
    host = f"[{args.address}]" if ":" in args.address else args.address
    print(f"robret ui: serving on http://{host}:{args.port}  (Ctrl-C stops)", file=sys.stderr)
    if args.address not in ("127.0.0.1", "localhost", "::1"):
        print(f"robret ui: WARNING: listening on {args.address}: other machines can reach this page",
              file=sys.stderr)
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum, _frame):
        proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM,)}
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        return 130
    finally:
        for s, h in old.items():
            signal.signal(s, h)
