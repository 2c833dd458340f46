"""Subcommand modules of the robret CLI (see retrieval/cli.py)."""
