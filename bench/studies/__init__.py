"""Study pages under results/, each rendered from its committed rows by `python -m bench.studies.NAME`."""
