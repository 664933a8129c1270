"""Run reports: Markdown tables now; HTML with plots builds on the same rows."""

from kdistill.report.markdown import summary_table, write_report

__all__ = ["summary_table", "write_report"]
