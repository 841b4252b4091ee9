"""Draw a :class:`~healthimaging_df.cohort.CohortSummary` with matplotlib (the ``plot`` extra).

The figure is made with ``matplotlib.figure.Figure`` directly, not ``pyplot``: no global figure
registry, no GUI backend needed (it works under Agg, in CI and in notebooks alike).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from healthimaging_df.cohort import CohortSummary

__all__ = ["plot_summary"]

_MISSING = "(missing)"
# (field of CohortSummary, category column, count column, title, horizontal bars)
_PANELS = (
    ("modality", "Modality", "imageSetCount", "Image sets by modality", False),
    ("body_part", "BodyPartExamined", "imageSetCount", "Image sets by body part", True),
    ("sex", "PatientSex", "patientCount", "Patients by sex", False),
    ("study_year", "studyYear", "studyCount", "Studies by year", False),
    ("age_band", "ageBand", "studyCount", "Studies by age at study", False),
)


def _import_figure() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            'plotting needs matplotlib, an optional extra: pip install "healthimaging-df[plot]"'
        ) from None
    return Figure


def plot_summary(
    summary: CohortSummary,
    *,
    figsize: tuple[float, float] = (13.0, 7.5),
    max_bars: int = 12,
    title: str | None = None,
) -> Figure:
    """Bar charts of a cohort summary, one panel per category, plus the totals; returns the Figure.

    Parameters
    ----------
    summary
        From ``df.ahi.summary()``.
    figsize
        Figure size in inches.
    max_bars
        Body parts beyond the most frequent *max_bars* are left out (the panel says so).
    title
        Figure title; by default the totals.
    """
    figure_class = _import_figure()
    figure: Figure = figure_class(figsize=figsize, layout="constrained")
    axes = figure.subplots(2, 3)
    for ax, (name, column, count, label, horizontal) in zip(axes.flat, _PANELS, strict=False):
        frame = getattr(summary, name)
        shown = frame.head(max_bars) if horizontal else frame
        labels = shown[column].astype("string").fillna(_MISSING).tolist()
        values = shown[count].fillna(0).astype("int64").to_numpy()
        if horizontal:
            ax.barh(labels[::-1], values[::-1], color="tab:blue")
            ax.set_xlabel(count)
        else:
            ax.bar(labels, values, color="tab:blue")
            ax.set_ylabel(count)
            ax.tick_params(axis="x", labelrotation=45 if len(labels) > 6 else 0)
        hidden = len(frame) - len(shown)
        ax.set_title(label + (f" (top {max_bars}, {hidden} more)" if hidden else ""))
    totals = axes.flat[-1]
    totals.axis("off")
    totals.text(
        0.05,
        0.5,
        f"{summary.image_sets:,} image sets\n{summary.studies:,} studies\n"
        f"{summary.patients:,} patients",
        fontsize=14,
        va="center",
    )
    figure.suptitle(title if title is not None else "Cohort summary")
    return figure
