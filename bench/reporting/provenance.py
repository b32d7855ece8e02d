"""Which code and which settings produced the rows of a table: a results page comes from one clean commit, and
averages only rows of one configuration.

Every row records `git_commit` (bench.harness.provenance: HEAD, with "-dirty" when the tree had uncommitted
changes). A table that averages rows of two commits, or of a dirty tree whose changes nobody can recover, compares
code nobody can name. `require_one_commit` refuses such a set of rows with one line that lists the commits and
says what to do; `allow_mixed=True` lets it through, and the page then lists every commit with its cell count.
"""

from __future__ import annotations

import pandas as pd

from bench.errors import UsageError


def commit_counts(df: pd.DataFrame) -> pd.Series:
    """Cells per recorded commit ("unknown" where a row has none), most cells first."""
    c = df["git_commit"].fillna("").astype(str).replace("", "unknown") if "git_commit" in df else \
        pd.Series(["unknown"] * len(df))
    return c.value_counts()


def is_clean(commit: str) -> bool:
    return commit not in ("", "unknown") and not commit.endswith("-dirty")


def describe(counts: pd.Series) -> str:
    """'abc123def456 (57 cells), 0123456789ab-dirty (3 cells)'."""
    return ", ".join(f"{c.removesuffix('-dirty')[:12]}{'-dirty' if c.endswith('-dirty') else ''} ({n} cells)"
                     for c, n in counts.items())


def require_one_commit(df: pd.DataFrame, what: str, allow_mixed: bool = False) -> str:
    """One line naming the commit(s) of `df`'s rows; raises UsageError when they are not one clean commit and
    `allow_mixed` is False."""
    counts = commit_counts(df)
    if len(counts) == 1 and is_clean(counts.index[0]):
        return f"commit {counts.index[0][:12]}"
    if not allow_mixed:
        why = "several commits" if len(counts) > 1 else "a tree with uncommitted changes or no git"
        raise UsageError(f"{what}: the rows come from {why} ({describe(counts)}); a table must come from one clean "
                         "commit: rerun the cells from one commit (the grid resumes only what is missing in a fresh "
                         "--out), or pass --allow-mixed to show them together with every commit listed")
    return f"mixed commits, shown together on request: {describe(counts)}"


# a cell's settings as every row records them (the batch size is left out: it moves results at float level only)
CONFIG_FIELDS = ("samples", "sampler", "steps", "overrides")


def require_one_configuration(df: pd.DataFrame, what: str) -> None:
    """Raise UsageError when rows of one (model, method, bits) differ in a setting (sample count, sampler, method
    knobs): averaging them over seeds would mix two experiments. The batch size is not compared (it moves results
    at float level only)."""
    fields = [f for f in CONFIG_FIELDS if f in df]
    for (model, method, bits), g in df.groupby(["model", "method", "bits"], sort=False):
        for f in fields:
            vals = sorted({str(v) for v in g[f] if not pd.isna(v)})
            if len(vals) > 1:
                raise UsageError(f"{what}: {model} {method} {bits} has rows with different {f} ({' | '.join(vals)}); "
                                 "a table averages one configuration: write each configuration to its own --out, "
                                 "or rerun the cells with one")
