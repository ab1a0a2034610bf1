"""Command-line analysis tools: `tools/NAME.py ARGS` from the repository root (also importable for tests)."""
