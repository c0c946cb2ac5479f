"""Campaign reports: summary tables, comparisons and self-contained HTML/Markdown reports."""

from flipsafe.report.render import write_report
from flipsafe.report.results import (
    CleanEval,
    Results,
    check_same_plan,
    load_results,
    with_unique_names,
)
from flipsafe.report.tables import (
    TextTable,
    comparison,
    fmt_count,
    fmt_factor,
    fmt_interval,
    fmt_rate,
    fmt_value,
    headline,
    summary_json,
    summary_lines,
    summary_table,
    summary_tables,
)

__all__ = [
    "CleanEval",
    "Results",
    "TextTable",
    "check_same_plan",
    "comparison",
    "fmt_count",
    "fmt_factor",
    "fmt_interval",
    "fmt_rate",
    "fmt_value",
    "headline",
    "load_results",
    "summary_json",
    "summary_lines",
    "summary_table",
    "summary_tables",
    "with_unique_names",
    "write_report",
]
