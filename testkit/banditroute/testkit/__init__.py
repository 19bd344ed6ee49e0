"""Fixtures shared by tests/ and bench/: synthetic routing data, a loopback moto S3 server, fuzzing, fault scenarios.

Installed only in a development install (pyproject.toml dev-mode-dirs); nothing in the product imports it.
"""
