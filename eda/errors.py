"""User-facing errors: one clear line that says what was expected and what to do.

The library raises them; the CLIs (bench.errors.cli_main) print `error: <message>` without a traceback. Usage errors
(unknown names, bad flags, malformed grid files) exit with status 2; everything else exits with status 1.
"""

from __future__ import annotations


class BenchError(Exception):
    """An error whose message is meant for a person; printed as one line, no traceback."""

    exit_code = 1


class UsageError(BenchError):
    """Bad input on the command line or in a config file (unknown name, bad bit width, malformed grid)."""

    exit_code = 2
