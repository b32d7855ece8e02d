"""Results store: one Parquet file per finished cell in a hive-partitioned dataset runs/grid=/model=/method=/.

Writes are atomic: on a path (local disk, NFS) a dotfile temp name in the partition directory, then `os.replace`;
dataset discovery ignores '.'/'_' prefixes, so a half-written file is never read. The root may also be a storage URI
(`bench.run --storage s3://bucket/prefix`, bench.harness.storage): there each row is one object, which appears whole
when its upload completes. Files are immutable; a rerun of a cell adds a file and readers keep the latest row per
cell key. The schema is explicit and typed, and reads pass an explicit hive
partitioning so partition keys come back as strings, not categoricals.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from bench.errors import BenchError
from bench.harness.storage import DISK_FULL, TEMP_PREFIX, write_atomic  # noqa: F401 - DISK_FULL, write_atomic re-exported
from bench.metrics.names import METRICS  # one float column per metric, NaN when not computed

PARTITIONS = ("grid", "model", "method")
STALE_TEMP_SECONDS = 600  # one row is written in milliseconds: an older temp was left by a killed writer
PARTITION_SCHEMA = pa.schema([(k, pa.string()) for k in PARTITIONS])

FILE_SCHEMA = pa.schema(
    [
        ("cell_key", pa.string()),
        ("run_id", pa.string()),
        ("git_commit", pa.string()),
        ("time", pa.timestamp("us", tz="UTC")),
        ("dataset", pa.string()),
        ("sampler", pa.string()),
        ("steps", pa.int32()),
        ("bits", pa.string()),
        ("w_bits", pa.int32()),
        ("a_bits", pa.int32()),
        ("seed", pa.int32()),
        ("sample_seed", pa.int32()),  # noise seed of the evaluated samples (bench.harness.seeds)
        ("calib_seed", pa.int32()),  # noise seed of the calibration trajectories; null for fp
        ("samples", pa.int32()),
        ("batch_size", pa.int32()),  # sampling / evaluation batch: results move with it at float-noise level
        ("calib_size", pa.int32()),
        # the FID reference: "digits/test, 360 images, stats <sha1>, extractor fid-helper, mode clean"
        # (bench.metrics.reference.describe_reference); null without Inception metrics and in older rows
        ("reference", pa.string()),
        *[(m, pa.float64()) for m in METRICS],
        ("eps_mse_per_step", pa.list_(pa.float64())),
        ("allocation", pa.list_(pa.int64())),
        ("quant_seconds", pa.float64()),
        ("sampling_seconds", pa.float64()),
        ("eval_seconds", pa.float64()),
        ("total_seconds", pa.float64()),
        ("peak_memory_mb", pa.float64()),
        ("device", pa.string()),
        # float details that change results without being settings (README "Grids, results and the regression
        # check"): torch threads of the worker, and the CPU kernels it ran (ISA, oneDNN on/off, ISA caps from env)
        ("threads", pa.int32()),
        ("cpu_kernels", pa.string()),
        ("host", pa.string()),
        # where the cell ran, filled by the worker (bench.harness.provenance.node_info); null in rows written before
        # these columns existed (readers fill absent columns with nulls), and the GPU ones null on a CPU worker
        ("node_id", pa.string()),  # Ray node id (ray.get_runtime_context().get_node_id()); null outside Ray
        ("gpu_name", pa.string()),
        ("gpu_count", pa.int32()),  # GPUs visible to the worker (its Ray share), not the node's
        ("cuda_version", pa.string()),  # torch.version.cuda: the CUDA runtime torch was built with
        ("gpu_driver", pa.string()),  # NVIDIA driver version (nvidia-smi / NVML)
        ("versions", pa.string()),  # JSON {package: version}
        ("status", pa.string()),  # "ok" | "failed"
        ("error", pa.string()),
        ("attempts", pa.int32()),
        ("overrides", pa.string()),  # JSON of the cell's method overrides
        ("info", pa.string()),  # JSON of the method's resolved config (QuantResult.info["config"])
        ("sample_grid", pa.string()),  # path of the PNG sample grid, relative to the store root
        ("samples_file", pa.string()),  # the cell's samples (bench.run --save-samples; bench.harness.samples)
    ]
)
SCHEMA = pa.schema(list(PARTITION_SCHEMA) + list(FILE_SCHEMA))


def is_uri(root: str | os.PathLike) -> bool:
    return "://" in str(root)


def runs_dir(out: str | os.PathLike) -> Path | str:
    """The results dataset under `out` (a folder, or a storage URI: then a URI)."""
    return f"{str(out).rstrip('/')}/runs" if is_uri(out) else Path(out) / "runs"


def partition_parts(grid: str, model: str, method: str) -> list[str]:
    """Hive folder names for a cell; values are URI-encoded (':' in 'eda-dm:tdac-only'), which hive reads decode."""
    return [f"{k}={quote(str(v), safe='')}" for k, v in zip(PARTITIONS, (grid, model, method))]


def partition_dir(root: str | os.PathLike, grid: str, model: str, method: str) -> Path:
    """Hive directory for a cell under a local root."""
    return Path(root).joinpath(*partition_parts(grid, model, method))


def empty_row() -> dict:
    """A row with every column present: NaN metrics, None elsewhere."""
    row = {f.name: None for f in SCHEMA}
    row.update({m: math.nan for m in METRICS})
    return row


def _table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    cols = {}
    for f in schema:
        vals = [r.get(f.name) for r in rows]
        if pa.types.is_floating(f.type):
            vals = [math.nan if v is None else float(v) for v in vals]
        else:  # rows read back through pandas carry NaN / pd.NA where the value is missing
            vals = [None if _missing(v) else v for v in vals]
        cols[f.name] = pa.array(vals, type=f.type)
    return pa.table(cols, schema=schema)


def write_row(root: str | os.PathLike, row: dict) -> Path | str:
    """Write one result row as its own Parquet file, atomically (write_atomic, or one object under a storage URI).
    Returns the final path."""
    missing = [k for k in PARTITIONS if not row.get(k)]
    if missing:
        raise BenchError(f"result row lacks partition keys {missing}; this is a harness bug")
    table = _table([row], FILE_SCHEMA)
    parts = [*partition_parts(row["grid"], row["model"], row["method"]), f"{row['cell_key']}-{uuid.uuid4().hex[:8]}.parquet"]
    if is_uri(root):
        return write_store_file(root, parts, _parquet_bytes(table))
    return write_atomic(Path(root).joinpath(*parts), lambda tmp: pq.write_table(table, tmp))  # no copy in memory


def write_store_file(root: str | os.PathLike, parts: list[str], data: bytes) -> Path | str:
    """Write a file of the store (`parts` below the root) atomically: write_atomic under a folder, one object (or a
    temp file and rename, for file://) under a storage URI (bench.harness.storage). Returns its path or URI."""
    if not is_uri(root):
        return write_atomic(Path(root).joinpath(*parts), lambda tmp: tmp.write_bytes(data))
    from bench.harness.storage import open_storage

    st = open_storage(root)
    st.write_bytes(st.path(*parts), data)
    return f"{str(root).rstrip('/')}/{'/'.join(parts)}"


def read_store_file(root: str | os.PathLike, rel: str) -> bytes | None:
    """A file of the store (a row's sample_grid, relative to the root) as bytes; None when absent."""
    if is_uri(root):
        from bench.harness.storage import open_storage

        st = open_storage(root)
        path = st.path(*rel.split("/"))
        return st.read_bytes(path) if st.is_file(path) else None
    p = Path(root) / rel
    return p.read_bytes() if p.is_file() else None


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def remove_stale_temps(root: str | os.PathLike, older_than: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Delete temp files that a killed writer left under a runs/ root (SIGKILL skips write_row's cleanup). Readers
    never see them (dotfiles); this only reclaims the space. Young temps may belong to a live writer: kept."""
    if is_uri(root):  # object stores have no temps (an object appears when its upload completes)
        return []
    root = Path(root)
    if not root.is_dir():
        return []
    cutoff, removed = time.time() - older_than, []
    for p in root.rglob(f"{TEMP_PREFIX}*"):
        try:
            if p.is_file() and p.stat().st_mtime < cutoff:
                p.unlink()
                removed.append(p)
        except FileNotFoundError:  # another driver's cleanup got there first
            pass
    return removed


def read_runs(root: str | os.PathLike, grid: str | None = None, latest: bool = True) -> pd.DataFrame:
    """All rows under a runs/ root (a folder or a storage URI; optionally of one grid), with stable dtypes; latest
    row per (grid, cell key)."""
    fs = None
    if is_uri(root):
        import pyarrow.fs as pafs

        from bench.harness.storage import open_storage

        st = open_storage(root)
        if not st.fs.get_file_info(pafs.FileSelector(st.base, allow_not_found=True)):  # absent or empty
            return empty_frame()
        fs, root = st.fs, st.base
    else:
        root = Path(root)
        if not root.is_dir():
            return empty_frame()
        root = str(root)
    dataset = ds.dataset(root, schema=SCHEMA, format="parquet", filesystem=fs,
                         partitioning=ds.partitioning(PARTITION_SCHEMA, flavor="hive"),
                         exclude_invalid_files=False)
    flt = ds.field("grid") == grid if grid else None
    try:
        table = dataset.to_table(filter=flt)
    except (pa.ArrowInvalid, OSError) as e:  # a row file damaged outside the store's atomic writes
        raise BenchError(f"a results file under {root} is not readable Parquet ({str(e).splitlines()[0][:200]}); "
                         "delete that file (its cell is then rerun) or restore the folder") from None
    return _finish(table.to_pandas(types_mapper=_types), latest)


def read_file(path: str | os.PathLike, latest: bool = True) -> pd.DataFrame:
    """A flat Parquet file (a committed reference), cast to the store schema."""
    p = Path(path)
    if not p.is_file():
        raise BenchError(f"no results file at {p}; expected a Parquet file written by `python -m bench.check --update`")
    try:
        table = pq.read_table(p)
    except (pa.ArrowInvalid, OSError) as e:
        raise BenchError(f"{p} is not a readable Parquet results file ({str(e).splitlines()[0][:160]}); restore it "
                         "from git or regenerate it") from None
    missing = [f.name for f in SCHEMA if f.name not in table.column_names]
    for name in missing:
        table = table.append_column(name, pa.nulls(len(table), SCHEMA.field(name).type))
    table = table.select(SCHEMA.names).cast(SCHEMA)
    return _finish(table.to_pandas(types_mapper=_types), latest)


def write_file(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write rows as one flat Parquet file (the committed reference), atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.parent / f".tmp-{uuid.uuid4().hex}.parquet"
    pq.write_table(pa.Table.from_pandas(df[SCHEMA.names], schema=SCHEMA, preserve_index=False), tmp)
    os.replace(tmp, p)
    return p


def empty_frame() -> pd.DataFrame:
    return SCHEMA.empty_table().to_pandas(types_mapper=_types)


def _types(t: pa.DataType):
    """Nullable pandas dtypes for integer columns, so a missing value never turns int32 into float64."""
    return {pa.int32(): pd.Int32Dtype(), pa.int64(): pd.Int64Dtype()}.get(t)


def _finish(df: pd.DataFrame, latest: bool) -> pd.DataFrame:
    if latest and len(df):
        df = df.sort_values("time").drop_duplicates(["grid", "cell_key"], keep="last")
    return df.reset_index(drop=True)


def done_keys(root: str | os.PathLike, grid: str) -> set[str]:
    """Cell keys of a grid whose latest row succeeded: what resume skips (failed cells are retried)."""
    df = read_runs(root, grid)
    return set(df.loc[df["status"] == "ok", "cell_key"])


def importable_rows(df: pd.DataFrame, grid: str, keys: set[str]) -> pd.DataFrame:
    """The rows of a results file (read_file) that can seed a store for `grid`: that grid's successful rows whose
    cell key is one of `keys` (the cells the grid plans now: a row of an edited or renamed cell is not its result)."""
    return df[(df["grid"] == grid) & (df["status"] == "ok") & df["cell_key"].isin(keys)]


def import_rows(root: str | os.PathLike, df: pd.DataFrame) -> int:
    """Write rows read back from a results file (read_file) into a store as if their cells had just run, so a grid
    resumes from a committed file when its runs/ folder is gone (another machine, a wiped scratch disk); rows the
    store already holds as done are skipped. Returns the number written."""
    n = 0
    for grid, g in df.groupby("grid"):
        for rec in g[~g["cell_key"].isin(done_keys(root, grid))].to_dict("records"):
            write_row(root, rec)
            n += 1
    return n


def _missing(v) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v))


def loads(s: str | None) -> dict:
    return json.loads(s) if s else {}
