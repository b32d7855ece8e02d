"""Grid files -> cells. A grid is a TOML file under bench/grids/ (or any path): models x methods x bit widths x seeds,
with sample counts, sampler settings and per-method overrides. A cell is one (model, method, bits, seed) run.

Layout of a grid file (see bench/grids/smoke.toml for a commented example):

    name = "smoke"
    [defaults]            # apply to every [[model]] block unless the block says otherwise
    methods = [...]; bits = ["W8A8", "W4A8"]; seeds = [0]; samples = 64; metrics = [...]; batch_size = 256
    [set]                 # overrides passed to every method (e.g. iters_scale)
    [method."eda-dm"]     # overrides for one method only (win over [set])
    [[model]]             # one block per model; any key of [defaults] may be repeated here
    name = "digits-ddpm"; sampler = { kind = "ddim", steps = 100, eta = 0.0, skip = "quad" }
    resources = { gpus = 1, cpus = 8, memory = "40GiB" }   # optional: what each actor running this model asks
                          # Ray for (wins over the grid's [resources]; --gpus/cpus-per-worker win over both)
    fid_mode = "legacy_tensorflow"           # optional: clean-fid's FID pipeline (default "clean")
    reference_stats = "stats/cifar10.npz"    # optional: precomputed statistics (clean-fid / ADM .npz), relative
                          # to the grid file

The FP method has no bit width: it expands to one cell per (model, seed) labelled "FP" (W32A32 in the store).
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from bench.errors import UsageError
from bench.metrics.names import FID_MODES  # torch-free
from eda.policy import parse_bits  # torch-free

GRIDS_DIR = Path(__file__).resolve().parents[1] / "grids"  # bench/grids
FP_METHOD = "fp"
FP_BITS = "FP"
_DEFAULT_KEYS = {"methods", "bits", "seeds", "samples", "metrics", "sampler", "batch_size", "calib", "fid_mode",
                 "reference_stats"}
_BLOCK_KEYS = _DEFAULT_KEYS | {"resources"}  # resources are per model: [defaults] has the grid's [resources]
_RESOURCE_KEYS = ("gpus", "cpus", "memory")
_MEMORY_UNITS = {"": 2**30, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
                 "gib": 2**30, "tib": 2**40}
_TOP_KEYS = {"name", "description", "defaults", "set", "method", "model", "imports", "resources", "check"}


def cell_bits(bits: str) -> tuple[int, int]:
    """(weight, activation) bits of a cell's setting: 'FP' -> (32, 32), else eda.policy.parse_bits
    ('W4A8' -> (4, 8))."""
    return (32, 32) if bits == FP_BITS else parse_bits(bits)


@dataclass(frozen=True)
class Cell:
    """One unit of work: quantize `model` with `method` at `bits`, sample `samples` images from `seed`, evaluate."""

    grid: str
    model: str
    method: str
    bits: str
    seed: int
    samples: int
    sampler: dict | None = None  # None = the model's official sampler (DiffusionModel.sampler)
    metrics: tuple[str, ...] = ()
    overrides: dict = field(default_factory=dict)
    batch_size: int = 256
    # FID pipeline (bench.metrics.inception.MODES) and precomputed reference statistics (a clean-fid / ADM .npz);
    # left out of the key at their defaults, so cells defined before they existed keep their keys
    fid_mode: str = "clean"
    reference_stats: str | None = None

    @property
    def w_bits(self) -> int:
        return cell_bits(self.bits)[0]

    @property
    def a_bits(self) -> int:
        return cell_bits(self.bits)[1]

    @property
    def key(self) -> str:
        """Content hash of everything that changes the result (not the grid name): resume and check match on it."""
        d = asdict(self)
        d.pop("grid")  # batch_size stays: it changes results at float-noise level (tests/test_determinism.py)
        for k, default in KEY_DEFAULTS.items():
            if d.get(k) == default:
                d.pop(k)
        blob = json.dumps(d, sort_keys=True, default=list)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    def label(self) -> str:
        return f"{self.model}/{self.method}/{self.bits}/seed{self.seed}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Cell:
        d = dict(d)
        d["metrics"] = tuple(d.get("metrics", ()))
        return cls(**d)


# Cell fields hashed into the key only when set otherwise than their defaults (fields added after keys existed)
KEY_DEFAULTS = {f.name: f.default for f in fields(Cell) if f.name in ("fid_mode", "reference_stats")}


@dataclass
class Grid:
    """A parsed grid file. `cells()` expands it in file order: model, then method, then bits, then seed."""

    name: str
    description: str
    models: list[dict]
    overrides: dict  # [set]
    method_overrides: dict  # [method."name"]
    imports: list[str]
    resources: dict
    check: dict
    path: str = ""
    # model -> {"gpus", "cpus", "memory" (bytes)}: each given key of its blocks' `resources`, validated
    model_resources: dict = field(default_factory=dict)
    cli_overrides: dict = field(default_factory=dict)  # --set: wins over [set] and [method."..."]

    def cells(self) -> list[Cell]:
        """Every cell once, in file order. Two blocks can name the same cell (a grid lists a model twice, or
        --methods/--bits overrides make an ablation block repeat the main one): it is run and counted once."""
        out, seen = [], set()
        for block in self.models:
            for method in block["methods"]:
                ovr = {**self.overrides, **self.method_overrides.get(method, {}), **self.cli_overrides}
                bit_list = [FP_BITS] if method == FP_METHOD else block["bits"]
                for bits in bit_list:
                    for seed in block["seeds"]:
                        cell = Cell(grid=self.name, model=block["name"], method=method, bits=bits,
                                        seed=int(seed), samples=int(block["samples"]), sampler=block.get("sampler"),
                                        metrics=tuple(block["metrics"]), overrides=ovr,
                                        batch_size=int(block["batch_size"]),
                                        fid_mode=block.get("fid_mode", "clean"),
                                        reference_stats=block.get("reference_stats"))
                        if cell.key not in seen:
                            seen.add(cell.key)
                            out.append(cell)
        return out

    def model_names(self) -> list[str]:
        return [b["name"] for b in self.models]

    def method_names(self) -> list[str]:
        seen: dict[str, None] = {}
        for b in self.models:
            seen.update(dict.fromkeys(b["methods"]))
        return list(seen)


def available_grids() -> list[str]:
    return sorted(p.stem for p in GRIDS_DIR.glob("*.toml"))


def grid_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" and p.is_file():
        return p
    cand = GRIDS_DIR / f"{name_or_path}.toml"
    if cand.is_file():
        return cand
    raise UsageError(f"unknown grid {name_or_path!r}; expected one of {', '.join(available_grids())} "
                     "or a path to a .toml grid file")


def load_grid(name_or_path: str) -> Grid:
    """Read and validate a grid file; bad keys or values raise a one-line UsageError naming the file."""
    path = grid_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not valid TOML ({e}); fix the grid file") from None
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise UsageError(f"{path}: unknown top-level keys {sorted(unknown)}; expected {sorted(_TOP_KEYS)}")
    defaults = data.get("defaults", {})
    _check_keys(path, "[defaults]", defaults)
    blocks = data.get("model", [])
    if not blocks:
        raise UsageError(f"{path}: no [[model]] blocks; add at least one with name = \"...\"")
    models = []
    for b in blocks:
        if "name" not in b:
            raise UsageError(f"{path}: a [[model]] block has no name; add name = \"...\"")
        _check_keys(path, f"[[model]] {b['name']}", {k: v for k, v in b.items() if k != "name"}, _BLOCK_KEYS)
        m = {"metrics": [], "batch_size": 256, "sampler": None, **defaults, **b}
        for k in ("methods", "bits", "seeds", "samples"):
            if k not in m:
                raise UsageError(f"{path}: model {b['name']!r} has no {k!r}; set it in [defaults] or the block")
        for bits in m["bits"]:
            cell_bits(bits)
        _check_seeds(path, m["seeds"])
        if m.get("fid_mode", "clean") not in FID_MODES:
            raise UsageError(f"{path}: model {b['name']!r} has fid_mode {m['fid_mode']!r}; expected one of "
                             f"{', '.join(FID_MODES)}")
        if m.get("reference_stats") is not None:
            stats = Path(m["reference_stats"]).expanduser()
            m["reference_stats"] = str(stats if stats.is_absolute() else (path.parent / stats).resolve())
        if "resources" in b:
            m["resources"] = block_resources(path, b["name"], b["resources"])
        models.append(m)
    model_resources: dict[str, dict] = {}
    for m in models:
        spec = m.get("resources", {})
        if model_resources.setdefault(m["name"], spec) != spec:
            # actors hold one model and take any of its cells, so its blocks cannot ask for different actors
            raise UsageError(f"{path}: model {m['name']!r} is in several [[model]] blocks with different resources "
                             f"({model_resources[m['name']]} and {spec}); give them the same resources")
    return Grid(name=data.get("name", path.stem), description=data.get("description", ""), models=models,
                overrides=data.get("set", {}), method_overrides=data.get("method", {}),
                imports=list(data.get("imports", [])), resources=data.get("resources", {}),
                check=data.get("check", {}), path=str(path),
                model_resources={k: v for k, v in model_resources.items() if v})


def _check_seeds(where, seeds) -> None:
    from bench.harness.seeds import check_seed

    for s in seeds:
        try:
            check_seed(s)
        except UsageError as e:
            raise UsageError(f"{where}: {e}") from None


def _check_keys(path: Path, where: str, d: dict, allowed: set[str] = _DEFAULT_KEYS) -> None:
    unknown = set(d) - allowed
    if unknown:
        raise UsageError(f"{path}: {where} has unknown keys {sorted(unknown)}; expected some of {sorted(allowed)}")


def block_resources(path, model: str, spec) -> dict:
    """A [[model]] block's `resources = { gpus = G, cpus = C, memory = M }`, validated (one-line UsageError naming the
    file, model and key): G >= 0 (a fraction packs actors on a GPU; above 1 a whole number, as Ray requires), C > 0,
    M > 0 in GiB or a string with a unit ("512MiB", "40GiB", "16GB"). Memory is returned in bytes (Ray's unit)."""
    where = f"{path}: model {model!r} resources"
    if not isinstance(spec, dict):
        raise UsageError(f"{where} must be a table such as {{ gpus = 1, cpus = 4, memory = \"16GiB\" }}")
    unknown = sorted(set(spec) - set(_RESOURCE_KEYS))
    if unknown:
        raise UsageError(f"{where} has unknown keys {unknown}; expected some of {list(_RESOURCE_KEYS)}")
    out = {}
    for k in ("gpus", "cpus"):
        if k not in spec:
            continue
        v = spec[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (k == "cpus" and v == 0):
            raise UsageError(f"{where}: {k} = {v!r}; expected a number {'>= 0' if k == 'gpus' else '> 0'}, "
                             f"e.g. {k} = {1 if k == 'gpus' else 4}")
        if k == "gpus" and v > 1 and v != int(v):
            raise UsageError(f"{where}: gpus = {v}; above 1 GPU Ray takes whole GPUs only (fractions are for "
                             "packing actors on one GPU: 0.5, 0.25)")
        out[k] = float(v)
    if "memory" in spec:
        out["memory"] = _memory_bytes(where, spec["memory"])
    return out


def _memory_bytes(where: str, v) -> int:
    import re

    bad = UsageError(f"{where}: memory = {v!r}; expected a positive size, in GiB as a number (memory = 16) or with "
                     "a unit (memory = \"512MiB\", \"40GiB\", \"16GB\")")
    if isinstance(v, bool):
        raise bad
    if isinstance(v, (int, float)):
        size, unit = float(v), ""
    elif isinstance(v, str) and (m := re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", v)) \
            and m.group(2).lower() in _MEMORY_UNITS:
        size, unit = float(m.group(1)), m.group(2).lower()
    else:
        raise bad
    n = int(size * _MEMORY_UNITS[unit])
    if n <= 0:
        raise bad
    return n


def apply_overrides(grid: Grid, samples: int | None = None, seeds: list[int] | None = None,
                    methods: list[str] | None = None, bits: list[str] | None = None,
                    models: list[str] | None = None, sets: dict[str, Any] | None = None,
                    batch_size: int | None = None) -> Grid:
    """Command-line overrides (--samples, --seeds, --methods, --bits, --models, --set, --batch-size) applied to every
    block."""
    if models:
        unknown = [m for m in models if m not in grid.model_names()]
        if unknown:
            raise UsageError(f"models {unknown} are not in grid {grid.name!r}; expected some of {grid.model_names()}")
    for b in bits or []:
        cell_bits(b)
    if seeds is not None:
        _check_seeds("--seeds", seeds)
    blocks = []
    for b in grid.models:
        if models and b["name"] not in models:
            continue
        b = dict(b)
        if samples is not None:
            b["samples"] = samples
        if seeds is not None:
            b["seeds"] = seeds
        if methods is not None:
            b["methods"] = methods
        if bits is not None:
            b["bits"] = bits
        if batch_size is not None:
            b["batch_size"] = batch_size
        blocks.append(b)
    return replace(grid, models=blocks, cli_overrides={**grid.cli_overrides, **(sets or {})})
