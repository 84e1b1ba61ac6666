"""Reports: the only layer that draws. Each module renders results it is given; none runs a model.

=================  ==============================================================================
``tables``         terminal and Markdown tables
``results``        results as JSON and Markdown, written atomically
``plots``          PNG plots, one function per kind (``_figure`` holds what they share)
``lift_plot``      the lift plot ``plot_policy_metrics`` draws for rows carrying a ``lift``
``search_report``  the search report (``search.md``, its plots, ``report.html``)
``html``           Markdown to one self-contained HTML page (``report.html``)
``review_page``    the audit's ``review.html``, to decide flagged images in a browser
``evaluate_md``    the Markdown and plots of ``ttakit evaluate``
``demo_md``        the demo's lessons in words
``ensemble_md``    the display rows of ``ttakit ensemble``
``audit_md``       the audit's ``issues.csv`` and contact sheet
=================  ==============================================================================

The names below are the reporting API (:func:`format_table`, :func:`write_results`, the plots).
"""

from ._figure import PLOTS_HINT, require_plots
from .plots import (
    lift_plot_layout,
    plot_candidate_lifts,
    plot_lr_find,
    plot_policy_metrics,
    plot_reliability_diagram,
    plot_views_curve,
)
from .results import write_results
from .search_report import (
    search_cost_lines,
    search_display_rows,
    search_markdown,
    write_search_report,
)
from .tables import format_mean_std, format_table, markdown_table, plural

__all__ = [
    "PLOTS_HINT", "require_plots", "lift_plot_layout", "plot_candidate_lifts", "plot_lr_find",
    "plot_policy_metrics", "plot_reliability_diagram", "plot_views_curve", "write_results",
    "search_cost_lines", "search_display_rows", "search_markdown", "write_search_report",
    "format_mean_std", "format_table", "markdown_table", "plural",
]
