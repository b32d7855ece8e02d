"""Reporting: tables (mean ± CI across seeds, Markdown/LaTeX), plots, the report page and the regression check's rule."""
