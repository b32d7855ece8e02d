"""The CLIs' error handling: `cli_main` turns the library's `BenchError` into one line and an exit code.

The error classes live in the method library (eda/errors.py) and are re-exported here: `bench.errors.BenchError` and
`bench.errors.UsageError` are the same classes. Usage errors exit with status 2; everything else exits with status 1.
"""

from __future__ import annotations

import functools
import sys

from eda.errors import BenchError, UsageError

__all__ = ["BenchError", "UsageError", "cli_main"]


def cli_main(fn):
    """Decorate a CLI `main(argv=None)`: turn `BenchError` into one line on stderr and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BenchError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(e.exit_code) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
