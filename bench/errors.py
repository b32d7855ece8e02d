"""User-facing errors: one clear line that says what was expected and what to do.

CLIs catch `BenchError` and print `error: <message>` without a traceback. Usage errors (unknown names, bad flags,
malformed grid files) exit with status 2; everything else exits with status 1.
"""

from __future__ import annotations

import functools
import sys


class BenchError(Exception):
    """An error whose message is meant for a person; printed as one line, no traceback."""

    exit_code = 1


class UsageError(BenchError):
    """Bad input on the command line or in a config file (unknown name, bad bit width, malformed grid)."""

    exit_code = 2


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
