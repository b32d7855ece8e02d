"""Which Ray cluster a grid runs on, and what its workers get (pure functions: tested without a cluster).

Address, as Ray's own tools resolve it (`ray.init`, `ray job submit`):
  --address ADDR given             -> ADDR ("auto", "host:6379", "ray://host:10001" for a Ray Client)
  RAY_ADDRESS set                  -> attach to it (`ray job submit` sets it for the entrypoint; users export it)
  inside a Ray job without it      -> "auto" (the job supervisor's config variable says we run under a cluster)
  none of these                    -> "local": a fresh cluster on this machine, as before (a laptop, CI)

Runtime environment: Ray workers on other nodes do not inherit the driver's environment, nor its source tree. So
  - env_vars carries every EDA_BENCH_* variable and HF_HOME / HF_HUB_OFFLINE set in the driver (where models, data
    and caches are, offline mode), always;
  - when attaching to an existing cluster (not for the local default, whose workers run from this checkout), the
    project's packages eda/, baselines/ and bench/ travel as py_modules. We ship py_modules rather than a
    working_dir of the repository root: it uploads only the three packages (no results/, no .venv), leaves the
    workers' current directory alone, and puts the driver's code ahead of any eda-bench installed on the nodes,
    so the rows' git_commit (the driver's) is the code that ran. Nodes need only the dependencies installed.
  - `--runtime-env-json` is merged on top: its env_vars and py_modules are added to ours (e.g. an `--import`ed
    plugin package), other keys replace ours (e.g. pip packages the nodes lack), and null removes one.
Inside a Ray job, Ray merges the job's runtime_env with ours and refuses a conflict (the same key, or the same
environment variable): what the job was submitted with wins, so we drop those keys from ours, and ship no code when
the job already ships some (working_dir or py_modules).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bench.errors import UsageError

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("eda", "baselines", "bench")  # the project's importable packages (pyproject's packages.find)
ENV_PREFIX = "EDA_BENCH_"
ENV_NAMES = ("HF_HOME", "HF_HUB_OFFLINE")
# set by Ray's job supervisor for a `ray job submit` entrypoint: the job's runtime_env and metadata
JOB_CONFIG_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"
CODE_KEYS = ("working_dir", "py_modules")


@dataclass(frozen=True)
class Target:
    address: str  # what ray.init gets
    source: str  # "--address", "RAY_ADDRESS", "ray job" or "local"

    @property
    def local(self) -> bool:
        return self.source == "local"


def resolve_address(arg: str | None, environ: Mapping[str, str]) -> Target:
    """The cluster to run on (module docstring): --address, then RAY_ADDRESS, then a Ray job's cluster, else local."""
    if arg:
        return Target(arg, "--address")
    if environ.get("RAY_ADDRESS"):
        return Target(environ["RAY_ADDRESS"], "RAY_ADDRESS")
    if environ.get(JOB_CONFIG_VAR):
        return Target("auto", "ray job")
    return Target("local", "local")


def job_runtime_env(environ: Mapping[str, str]) -> dict:
    """The runtime_env a `ray job submit` gave this job ({} outside a job, or if Ray's variable is unreadable)."""
    try:
        return dict(json.loads(environ.get(JOB_CONFIG_VAR) or "{}").get("runtime_env") or {})
    except (ValueError, AttributeError):
        return {}


def parse_runtime_env_json(text: str | None) -> dict:
    """--runtime-env-json: a JSON object (UsageError otherwise)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise UsageError(f"--runtime-env-json is not valid JSON ({e}); expected an object such as "
                         "'{\"pip\": [\"diffusers\"]}'") from None
    if not isinstance(value, dict) or not isinstance(value.get("env_vars", {}), dict):
        raise UsageError("--runtime-env-json must be a JSON object (with env_vars, if given, an object of strings), "
                         "such as '{\"env_vars\": {\"X\": \"1\"}, \"pip\": [\"diffusers\"]}'")
    return value


def build_runtime_env(target: Target, environ: Mapping[str, str], extra: dict | None = None,
                      repo: Path = REPO) -> dict:
    """The runtime_env for ray.init (module docstring); {} when there is nothing to pass."""
    env_vars = {k: str(v) for k, v in environ.items() if k.startswith(ENV_PREFIX) or k in ENV_NAMES}
    renv: dict = {"env_vars": env_vars} if env_vars else {}
    job = job_runtime_env(environ)
    if not target.local and not any(job.get(k) for k in CODE_KEYS):
        renv["py_modules"] = [str(repo / p) for p in PACKAGES if (repo / p).is_dir()]
    extra = dict(extra or {})
    if extra.get("env_vars") is not None:
        renv["env_vars"] = {**renv.get("env_vars", {}), **{k: str(v) for k, v in extra.pop("env_vars").items()}}
    if isinstance(extra.get("py_modules"), list):  # a plugin package (--import) goes along with ours
        renv["py_modules"] = renv.get("py_modules", []) + [m for m in extra.pop("py_modules")
                                                           if m not in renv.get("py_modules", [])]
    renv.update(extra)
    # the job's own settings win over ours: Ray refuses to merge a key (or an environment variable) set twice
    for k in job:
        if k != "env_vars":
            renv.pop(k, None)
    if renv.get("env_vars"):
        renv["env_vars"] = {k: v for k, v in renv["env_vars"].items() if k not in (job.get("env_vars") or {})}
    return {k: v for k, v in renv.items() if v not in (None, {}, [])}
