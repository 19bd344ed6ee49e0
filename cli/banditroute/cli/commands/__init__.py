"""Subcommands of the `banditroute` CLI (one module each)."""
