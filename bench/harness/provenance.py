"""Provenance: what every result records about where it came from (lm-eval's habit): the git commit of the code,
package versions, host and device. Result rows (bench.harness.cell), the perf page and the study pages take it from
here; `environment()` is the whole record of a measurement taken in this process.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from datetime import UTC, datetime
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


def code_state() -> str:
    """git_commit(), plus a hash of the uncommitted changes to tracked files when the tree is dirty: what a
    reconstruction journal is bound to, so two different dirty trees never resume each other's work."""
    commit = git_commit()
    if not commit.endswith("-dirty"):
        return commit
    import hashlib

    try:
        diff = subprocess.run(["git", "diff", "HEAD"], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                              timeout=30)
        return f"{commit}:{hashlib.sha1(diff.stdout).hexdigest()[:12]}"
    except (OSError, subprocess.SubprocessError):
        return commit


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


def host() -> str:
    return platform.node()


def node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray): ties a row to `ray status` and the node's logs."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - provenance must never fail a cell
        return None


@functools.cache
def gpu_driver() -> str | None:
    """The NVIDIA driver version, from NVML when nvidia-ml-py is installed, else nvidia-smi; None if neither answers.
    torch knows only the CUDA runtime it was built with, not the driver, and old drivers are a common cause of
    GPU-only differences."""
    try:
        import pynvml

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:  # noqa: BLE001 - not installed, or no NVIDIA driver
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        lines = out.stdout.strip().splitlines()
        return lines[0].strip() if out.returncode == 0 and lines else None
    except (OSError, subprocess.SubprocessError):
        return None


def node_info(device: str) -> dict:
    """Where a cell runs (result row columns): Ray node id, and on a GPU worker the GPU's model, how many GPUs the
    worker sees, torch's CUDA version and the driver version; the GPU fields are None on a CPU worker."""
    info = {"node_id": node_id(), "gpu_name": None, "gpu_count": None, "cuda_version": None, "gpu_driver": None}
    if str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            info.update(gpu_name=torch.cuda.get_device_name(), gpu_count=torch.cuda.device_count(),
                        cuda_version=torch.version.cuda, gpu_driver=gpu_driver())
    return info


def cpu_kernels() -> str:
    """Which CPU code paths torch takes here: the ATen vector ISA, oneDNN on/off, and ISA caps set in the
    environment. Recorded with every row because other kernels round differently (results/noise.md)."""
    import torch

    parts = [torch.backends.cpu.get_cpu_capability()]
    if not torch.backends.mkldnn.enabled:
        parts.append("oneDNN off")
    parts += [f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
              if os.environ.get(k)]
    return "; ".join(parts)


def device_name() -> str:
    """The GPU's name when torch sees one, else "CPU (<processor>)"."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86_64'})"


def environment() -> dict:
    """Where and when a measurement ran: git commit, package versions, host, device, CPU count and torch threads,
    time (UTC, to the minute) and the 1-minute load average (timings on a shared machine mean little without it)."""
    import torch

    return {"git_commit": git_commit(), "versions": package_versions(), "host": host(), "device": device_name(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "time": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "load_average": os.getloadavg()[0]}
