"""compare.py's figures: loss curves on four cost axes, diagnostics, downstream accuracies, the
scaling view, lr sensitivity and the fitted loss across horizons. matplotlib is imported inside
the functions, so the maths never needs it.

Every run has its own colour, line style and marker, and earlier runs are drawn wider, so runs
whose curves coincide (a clip rate of 1.0 for all, say) all stay visible. A diverged run is never
part of a line's mean: it is drawn on its own, dotted, with an x where it diverged.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from analysis.horizons import Line as HorizonLine
from analysis.runs import Diverged, Run, series
from analysis.scaling import ScalingPoint
from analysis.sensitivity import LrPoint
from analysis.speedup import AXES, smooth
from analysis.units import si_format


@dataclass(frozen=True)
class Style:
    """How one run (or seed group) is drawn: the same in every panel and in the legend."""

    color: tuple
    linestyle: str | tuple
    marker: str
    linewidth: float
    markersize: float
    index: int  # drawing order; staggers the markers of runs whose points coincide


_LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)))
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
_MARKERS_PER_LINE = 10


def plot_styles(labels: Sequence[str]) -> dict[str, Style]:
    """A distinct colour, line style and marker per label. Earlier labels are drawn first and wider,
    so where curves coincide each one still shows as a rim or in the gaps of the dashes above it."""
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10")
    n = len(labels)
    styles = {}
    for i, label in enumerate(labels):
        width = 1.3 + 2.2 * (n - 1 - i) / (n - 1) if n > 1 else 1.6
        styles[label] = Style(cmap(i % 10), _LINESTYLES[i % len(_LINESTYLES)], _MARKERS[i % len(_MARKERS)],
                              width, 3.0 + 1.2 * width, i)
    return styles


def _band(member_series: list[tuple[list[float], list[float]]]):
    """Mean x, mean/min/max y of several series aligned by index (truncated to the shortest)."""
    n = min(len(xs) for xs, _ in member_series)
    xs = [sum(s[0][i] for s in member_series) / len(member_series) for i in range(n)]
    ys = [[s[1][i] for s in member_series] for i in range(n)]
    return xs, [sum(v) / len(v) for v in ys], [min(v) for v in ys], [max(v) for v in ys]


def _draw(ax, groups: dict[str, list[Run]], styles: dict[str, Style], x_key: str, y_key: str,
          smooth_n: int, diverged: Sequence[Diverged] = ()) -> bool:
    """Each group's mean line (and min/max band over seeds); True if any was drawn. The `diverged`
    runs are :func:`_draw_diverged`'s, and only keep the panel from reading "no points"."""
    drawn = False
    for label, members in groups.items():
        member_series = [series(r.records, x_key, y_key) for r in members]
        member_series = [s for s in member_series if s[0]]
        if not member_series:
            continue
        xs, mean, lo, hi = _band(member_series)
        if not xs:
            continue
        st = styles[label]
        # At most ~10 markers per line, each run's shifted by a fraction of the spacing, so runs with
        # identical points do not stack their markers on the same spots.
        every = max(1, len(xs) // _MARKERS_PER_LINE)
        offset = (st.index * max(1, every // max(1, len(styles)))) % every
        ax.plot(xs, smooth(mean, smooth_n), color=st.color, linestyle=st.linestyle, linewidth=st.linewidth,
                marker=st.marker, markersize=st.markersize, markevery=(offset, every), markerfacecolor="none",
                markeredgewidth=1.2, label=label, zorder=2 + st.index * 0.01)
        if len(member_series) > 1:
            ax.fill_between(xs, smooth(lo, smooth_n), smooth(hi, smooth_n), color=st.color, alpha=0.15,
                            linewidth=0)
        drawn = True
    if not drawn and not any(series(d.run.records, x_key, y_key)[0] for d in diverged):
        ax.text(0.5, 0.5, f"no {y_key} points", ha="center", va="center", transform=ax.transAxes, color="gray")
    return drawn


def _draw_diverged(ax, diverged: Sequence[Diverged], styles: dict[str, Style], x_key: str, y_key: str) -> None:
    """Each diverged run as a thin dotted line in its group's colour, with an x at its divergence
    point: at the last finite value up to it, held inside y limits already set (a blow-up far above
    the healthy runs still shows, at the top edge)."""
    for d in diverged:
        st = styles[d.label]
        xs, ys = series(d.run.records, x_key, y_key)
        if xs:
            ax.plot(xs, ys, color=st.color, linestyle=":", linewidth=1.0, alpha=0.8)
        x_at = next((r[x_key] for r in d.run.records if r.get("step") == d.divergence.step
                     and isinstance(r.get(x_key), (int, float))), None)
        before = [r for r in d.run.records if isinstance(r.get("step"), int) and r["step"] <= d.divergence.step]
        y_at = series(before, x_key, y_key)[1]
        if x_at is None or not y_at:
            continue
        y = y_at[-1]
        if not ax.get_autoscaley_on():
            lo, hi = ax.get_ylim()
            y = min(y, hi - 0.03 * (hi - lo))
        ax.plot([x_at], [y], linestyle="none", marker="x", color=st.color, markersize=10, markeredgewidth=2.2,
                zorder=5)


def _diverged_handle(diverged: Sequence[Diverged]) -> list[tuple]:
    """The legend entry explaining the x, when some run diverged."""
    from matplotlib.lines import Line2D

    if not diverged:
        return []
    return [(Line2D([], [], color="gray", linestyle=":", marker="x", markersize=9, markeredgewidth=2),
             "diverged run (x: where; left out of the mean)")]


def _loss_ylim(ax, groups: dict[str, list[Run]], x_key: str, y_key: str) -> None:
    # The first steps' loss (ln(vocab) ~ 11) would flatten everything that matters: clip the view.
    ys = [series(r.records, x_key, y_key)[1] for ms in groups.values() for r in ms]
    ys = [y for y in ys if y]
    if not ys:
        return
    lo = min(min(y) for y in ys)
    hi = max(y[len(y) // 10] for y in ys)
    if hi > lo:
        ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))


def _si_axis(axis) -> None:
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    # Few ticks with short SI labels: a 4-panel row leaves each axis ~4 inches.
    axis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]))
    axis.set_major_formatter(FuncFormatter(si_format))


def _add_legend(fig, styles: dict[str, Style], extra: Sequence[tuple] = ()) -> None:
    """One legend above the panels with an entry for every run (also those with no points in this
    figure) and the `extra` (handle, label) pairs, as many columns as fit; the figure grows so that
    neither panels nor legend are cut."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=st.color, linestyle=st.linestyle, linewidth=st.linewidth, marker=st.marker,
                      markersize=st.markersize, markerfacecolor="none", markeredgewidth=1.2)
               for st in styles.values()] + [h for h, _ in extra]
    labels = list(styles) + [label for _, label in extra]
    fig_w, fig_h = fig.get_size_inches()
    if not labels:
        fig.tight_layout()
        return
    renderer = fig.canvas.get_renderer()
    for ncol in range(min(4, len(labels)), 0, -1):
        legend = fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 1.0), ncol=ncol, fontsize=9,
                            handlelength=4.0, frameon=False)
        box = legend.get_window_extent(renderer)
        if box.width <= 0.98 * fig_w * fig.dpi or ncol == 1:
            break
        legend.remove()
    legend_w, legend_h = box.width / fig.dpi, box.height / fig.dpi
    # Widen for a label longer than the figure; heighten by the legend so the panels keep their size.
    fig.set_size_inches(max(fig_w, legend_w + 0.4), fig_h + legend_h + 0.1)
    fig.tight_layout(rect=(0, 0, 1, 1 - (legend_h + 0.1) / (fig_h + legend_h + 0.1)))


_X_LABELS = {"step": "optimizer steps", "tokens": "training tokens (incl. Hessian passes)",
             "flops": "FLOPs (model, incl. Hessian passes)", "time/elapsed": "wall-clock (s, excl. eval)"}
_X_TITLES = {"step": "steps", "tokens": "tokens", "flops": "FLOPs", "time/elapsed": "wall-clock time"}
_LOSS_LABELS = {"train/loss": ("training loss", "training loss (nats/token)"),
                "val/loss": ("validation loss", "validation loss (nats/token)")}


def loss_figure(groups: dict[str, list[Run]], smooth_n: int, styles: dict[str, Style] | None = None,
                diverged: Sequence[Diverged] = ()):
    """The 2x4 loss figure: train (top) and validation loss (bottom) against steps, tokens, FLOPs, seconds.

    `groups` hold the runs averaged into each line; `diverged` runs are drawn apart, each with an x."""
    import matplotlib.pyplot as plt

    styles = styles or plot_styles(list(groups))
    fig, axes = plt.subplots(2, 4, figsize=(20, 8.5), squeeze=False)
    for row, y_key in enumerate(("train/loss", "val/loss")):
        name, y_label = _LOSS_LABELS[y_key]
        for col, x_key in enumerate(AXES.values()):
            ax = axes[row][col]
            if _draw(ax, groups, styles, x_key, y_key, smooth_n, diverged):
                _loss_ylim(ax, groups, x_key, y_key)
            _draw_diverged(ax, diverged, styles, x_key, y_key)
            ax.set_title(f"{name} vs {_X_TITLES[x_key]}", fontsize=11)
            ax.set_xlabel(_X_LABELS[x_key])
            ax.set_ylabel(y_label)
            _si_axis(ax.xaxis)
            ax.grid(alpha=0.3)
    _add_legend(fig, styles, _diverged_handle(diverged))
    return fig


# (metrics.jsonl key, panel title, y-axis label); all four are plotted against optimizer steps.
DIAGNOSTIC_PANELS: list[tuple[str, str, str]] = [
    ("lr", "learning rate", "learning rate (log scale)"),
    ("grad/clip_rate", "grad-norm clip trigger rate (cumulative)", "fraction of steps clipped"),
    ("sophia/clip_frac", "Sophia clip fraction", "fraction of coordinates clipped"),
    ("sophia/win_rate", "Sophia win rate (1 - clip fraction)", "fraction of coordinates not clipped"),
]


def diagnostics_figure(groups: dict[str, list[Run]], styles: dict[str, Style] | None = None,
                       diverged: Sequence[Diverged] = ()):
    """The 2x2 diagnostics figure: lr, grad-clip trigger rate, Sophia clip fraction and win rate
    (`diverged` runs apart, as in :func:`loss_figure`)."""
    import matplotlib.pyplot as plt

    styles = styles or plot_styles(list(groups))
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), squeeze=False)
    for ax, (key, title, y_label) in zip((a for row in axes for a in row), DIAGNOSTIC_PANELS):
        drawn = _draw(ax, groups, styles, "step", key, 1, diverged)
        drawn = drawn or any(series(d.run.records, "step", key)[0] for d in diverged)
        if key == "lr":
            if drawn:  # Muon's and Lion's lrs differ by ~100x: log scale shows both
                ax.set_yscale("log")
        else:
            # Fractions: a fixed 0..1 range keeps a constant curve (all 1.0, say) off the frame's edge.
            ax.set_ylim(-0.04, 1.04)
        _draw_diverged(ax, diverged, styles, "step", key)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("optimizer steps")
        ax.set_ylabel(y_label if key != "lr" or drawn else "learning rate")
        _si_axis(ax.xaxis)
        ax.grid(alpha=0.3)
    _add_legend(fig, styles, _diverged_handle(diverged))
    return fig


# (metrics.jsonl key, panel title); both plotted against training tokens.
DOWNSTREAM_PANELS: list[tuple[str, str]] = [
    ("eval/hellaswag_acc", "HellaSwag accuracy (summed log-likelihood, acc)"),
    ("eval/hellaswag_acc_norm", "HellaSwag accuracy (per-token log-likelihood, acc_norm)"),
]


def has_downstream(groups: dict[str, list[Run]]) -> bool:
    """Did any run log a downstream accuracy?"""
    return any(key in rec for runs in groups.values() for r in runs for rec in r.records
               for key, _ in DOWNSTREAM_PANELS)


def downstream_figure(groups: dict[str, list[Run]], styles: dict[str, Style] | None = None,
                      diverged: Sequence[Diverged] = ()):
    """The 1x2 downstream figure: HellaSwag acc and acc_norm against training tokens (`diverged`
    runs apart, as in :func:`loss_figure`)."""
    import matplotlib.pyplot as plt

    styles = styles or plot_styles(list(groups))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), squeeze=False)
    for ax, (key, title) in zip(axes[0], DOWNSTREAM_PANELS):
        _draw(ax, groups, styles, "tokens", key, 1, diverged)
        ax.set_ylim(-0.02, 1.02)  # accuracies: chance is 0.25 with 4 endings
        _draw_diverged(ax, diverged, styles, "tokens", key)
        ax.axhline(0.25, color="gray", linewidth=0.8, linestyle=":")
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("training tokens (incl. Hessian passes)")
        ax.set_ylabel("accuracy (chance 0.25)")
        _si_axis(ax.xaxis)
        ax.grid(alpha=0.3)
    _add_legend(fig, styles, _diverged_handle(diverged))
    return fig


def plot(groups: dict[str, list[Run]], out: Path, smooth_n: int, diverged: Sequence[Diverged] = ()) -> list[Path]:
    """Write `loss.png` (2x4) and `diagnostics.png` (2x2) into `out`, and `downstream.png` when
    some run has downstream accuracies; returns the paths. `groups` are averaged into lines, the
    `diverged` runs drawn apart with an x where they diverged."""
    styles = plot_styles(list(groups))
    figures = [("loss.png", lambda: loss_figure(groups, smooth_n, styles, diverged)),
               ("diagnostics.png", lambda: diagnostics_figure(groups, styles, diverged))]
    if has_downstream(groups) or has_downstream({"diverged": [d.run for d in diverged]}):
        figures.append(("downstream.png", lambda: downstream_figure(groups, styles, diverged)))
    return [save_figure(draw, out / name) for name, draw in figures]


def save_figure(draw: Callable[[], Any], path: Path) -> Path:
    """Draw a figure (``draw()``) on the non-interactive Agg backend, write it to ``path`` as a
    100-dpi PNG and free it; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = draw()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def scaling_figure(points: Sequence[ScalingPoint]):
    """1x3: final val loss against non-embedding params and against total FLOPs, and val loss at the
    matched FLOPs budget against params; one line per optimizer, a min/max band over seeds."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    lines = sorted({p.line for p in points})
    styles = plot_styles(lines)
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.2), squeeze=False)
    panels = [("params", "final", "final validation loss vs model size", "non-embedding parameters"),
              ("flops", "final", "final validation loss vs training FLOPs",
               "total training FLOPs (incl. Hessian passes)"),
              ("params", "matched_budget", "validation loss at matched FLOPs vs model size",
               "non-embedding parameters")]
    for ax, (x_key, metric, title, x_label) in zip(axes[0], panels):
        for line in lines:
            pts = [p for p in points if p.line == line and (p.final if metric == "final" else p.at_budget)]
            if not pts:
                continue
            st = styles[line]
            stats = [ScalingPoint.stats(p.final if metric == "final" else p.at_budget) for p in pts]
            xs = [p.params if x_key == "params" else ScalingPoint.stats(p.flops)["mean"] for p in pts]
            ax.plot(xs, [s["mean"] for s in stats], color=st.color, linestyle=st.linestyle, marker=st.marker,
                    linewidth=st.linewidth, markersize=st.markersize, markerfacecolor="none", markeredgewidth=1.2,
                    label=line)
            if any(s["n"] > 1 for s in stats):
                ax.fill_between(xs, [s["min"] for s in stats], [s["max"] for s in stats], color=st.color,
                                alpha=0.15, linewidth=0)
        ax.set_xscale("log")
        # 1-2-5 ticks: tiny-model sweeps often span less than a decade, where 10^k ticks leave
        # one label or none
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(si_format))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, pos: ""))
        ax.set_title(title, fontsize=11)
        ax.set_xlabel(x_label)
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3, which="both")
    _add_legend(fig, styles)
    return fig


def lr_sensitivity_figure(points: dict[str, list[LrPoint]]):
    """Final loss against lr (log x), one line per optimizer: the mean over seeds with +-1 standard
    deviation; an x at the top of the axis where the chosen setting lost seeds to divergence (or
    every run diverged)."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator
    from matplotlib.transforms import blended_transform_factory

    styles = plot_styles(list(points))
    fig, ax = plt.subplots(figsize=(8, 5.2))
    top = blended_transform_factory(ax.transData, ax.transAxes)  # x in lr, y in axes fractions
    any_diverged = False
    for opt, pts in points.items():
        st = styles[opt]
        nan = float("nan")  # a gap in the line where every run diverged
        ax.errorbar([p.lr for p in pts], [nan if p.mean is None else p.mean for p in pts],
                    yerr=[0.0 if p.std is None else p.std for p in pts], color=st.color, linestyle=st.linestyle,
                    marker=st.marker, linewidth=st.linewidth, markersize=st.markersize, markerfacecolor="none",
                    markeredgewidth=1.2, capsize=4)
        bad = [p.lr for p in pts if p.diverged]
        if bad:
            any_diverged = True
            ax.plot(bad, [0.97] * len(bad), transform=top, linestyle="none", marker="x", color=st.color,
                    markersize=11, markeredgewidth=2.4, clip_on=False)
    ax.set_xscale("log")
    # 1-2-5 ticks: lr sweeps often span a decade or two, where 10^k ticks leave one label or two
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, pos: f"{x:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, pos: ""))
    ax.set_title("final validation loss vs learning rate (mean over seeds, +-1 std)", fontsize=11)
    ax.set_xlabel("peak learning rate (optimizer.lr, log scale)")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.grid(alpha=0.3, which="both")
    extra = [(Line2D([], [], color="gray", linestyle="none", marker="x", markersize=9, markeredgewidth=2),
              "diverged at this lr")] if any_diverged else []
    _add_legend(fig, styles, extra)
    return fig


def horizons_figure(lines: Sequence[HorizonLine]):
    """Final validation loss against training tokens (log x), one colour per horizon line: each
    horizon's mean over seeds with a min/max error bar, and the line's fit A * D^-alpha + E dashed
    over its horizons (thinner where the fit is not good)."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator

    styles = plot_styles([line.line for line in lines])
    fig, ax = plt.subplots(figsize=(9, 5.6))
    handles = []
    for line in lines:
        st = styles[line.line]
        hs = line.horizons
        means = [h.mean for h in hs]
        ax.errorbar([h.d for h in hs], means,
                    yerr=[[m - min(h.losses) for h, m in zip(hs, means)], [max(h.losses) - m for h, m in zip(hs, means)]],
                    color=st.color, linestyle="none", marker=st.marker, markersize=st.markersize,
                    markerfacecolor="none", markeredgewidth=1.4, capsize=4)
        text = line.line
        if line.fit is not None:
            grid = np.geomspace(hs[0].d, hs[-1].d, 200)
            ax.plot(grid, [line.fit.loss(x) for x in grid], color=st.color, linestyle="--",
                    linewidth=1.8 if line.good else 1.0, alpha=1.0 if line.good else 0.6)
            text += (f": alpha {line.fit.alpha:.3f}, E {line.fit.e:.3f}, rms {line.rms:.4f}"
                     + ("" if line.good else " (fit not good)"))
        else:
            text += f": no fit ({len(hs)} horizon(s))"
        handles.append((Line2D([], [], color=st.color, linestyle="--" if line.fit is not None else "none",
                               marker=st.marker, markersize=st.markersize, markerfacecolor="none",
                               markeredgewidth=1.4), text))
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(si_format))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, pos: ""))
    ax.set_title("final validation loss vs training tokens per horizon (mean, min/max over seeds; "
                 "dashed: A * D^-alpha + E)", fontsize=10)
    ax.set_xlabel("training tokens D (incl. Hessian passes, log scale)")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.grid(alpha=0.3, which="both")
    _add_legend(fig, {}, handles)
    return fig
