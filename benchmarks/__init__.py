"""robret benchmarks: scripts that measure and write JSON + Markdown + plots (never timed tests)."""
