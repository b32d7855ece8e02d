"""Reporting: tables (mean ± CI across seeds, Markdown/LaTeX), plots, the report page, the regression check's
rule."""
