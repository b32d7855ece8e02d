"""The CLIs' error handling: `cli_main` turns the library's `BenchError` into one line and an exit code.

The error classes live in the method library (eda/errors.py) and are re-exported here: `bench.errors.BenchError` and
`bench.errors.UsageError` are the same classes. Usage errors exit with status 2; everything else exits with status 1.
"""

from __future__ import annotations

import functools
import sys

from eda.errors import BenchError, UsageError

__all__ = ["BenchError", "UsageError", "cli_main", "hf_download_command"]


def hf_download_command() -> str:
    """The download command the installed huggingface_hub provides, for the offline errors that tell a person to
    fetch a model: `hf download` (huggingface_hub >= 0.34; 1.0 dropped `huggingface-cli`), else the older
    `huggingface-cli download`. Read from the package's console scripts, so the message names what is installed."""
    from importlib.metadata import entry_points

    names = {e.name for e in entry_points(group="console_scripts") if e.value.startswith("huggingface_hub")}
    return "huggingface-cli download" if "hf" not in names and "huggingface-cli" in names else "hf download"


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
