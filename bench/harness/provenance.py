"""Provenance: what every result records about where it came from (lm-eval's habit): the git commit of the code,
package versions, host and device.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path


def git_commit() -> str:
    """HEAD of the repository this code runs from, with "-dirty" for uncommitted changes; "" outside git."""
    try:
        root = Path(__file__).resolve().parents[2]  # the repository
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if sha.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def package_versions() -> dict[str, str]:
    """{package: version} of Python and the packages that move results."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("eda-bench", "torch", "diffusers", "ray", "numpy", "pyarrow", "clean-fid"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
