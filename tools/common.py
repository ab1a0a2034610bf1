"""The tools' command-line plumbing: a UserError becomes `error: ...` on stderr and exit status 2.

from lmtrain.tools.common import run_tool
raise SystemExit(run_tool(main))
"""

from __future__ import annotations

import sys

from lmtrain.errors import UserError


def run_tool(main, argv: list[str] | None = None) -> int:
    """Call `main(argv)`; a UserError prints `error: ...` without a traceback and returns 2."""
    try:
        return int(main(argv) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
