"""One module per CLI command; each exposes ``run(**options) -> int`` (the exit code).

The CLI (``trojanscan.cli``) only parses options and calls these; they return the
contract's exit code (0 nothing found, 1 found) and raise ``TrojanscanError`` for
bad input (the CLI turns it into one line on stderr and exit 2).
"""
