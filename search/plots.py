"""The Pareto plot of a search: a PNG for reports and an interactive HTML page (hover a point for
its trial, alias and settings). Objectives are shown in readable units (MACs in M, accuracy in
%), the front as a step (no point lies between two front points), early-stopped trials greyed
with the epoch they stopped at; where a search spans several operators (DGC, SG-CNN, DyNet, ...)
every trial and front point is coloured by its operator."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from trainables import metrics as M

#: metric -> (factor, axis label)
UNITS = {
    M.MACS: (1e-6, "MACs (M)"),
    M.PARAMS: (1e-6, "parameters (M)"),
    M.VAL_ACCURACY: (100.0, "validation accuracy (%)"),
    M.VAL_LOSS: (1.0, "validation loss"),
    M.LATENCY_MS: (1.0, "batch-1 latency (ms)"),
}


#: operator kind (dgc.model_kind) -> (legend name, matplotlib colour, plotly colour)
OPERATORS = {
    "dense": ("dense", "0.3", "dimgray"),
    "group": ("static group", "C0", "#1f77b4"),
    "dynamic": ("DGC", "C1", "#ff7f0e"),
    "selfgroup": ("SG-CNN", "C2", "#2ca02c"),
    "dynet": ("DyNet", "C4", "#9467bd"),
}


def operator(p: Any) -> str:
    """A point's operator kind, from its logged model name."""
    import dgc

    return dgc.model_kind(p.params.get("model.name", ""))


def fmt_setting(text: str) -> str:
    """A logged parameter for people: floats to 3 significant digits, lists kept as lists."""
    if text in ("None", "null", ""):
        return "-"  # not set for this trial (a reference's heads, say)
    try:
        value = json.loads(text)
    except ValueError:
        return text

    def short(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        if isinstance(v, list):
            return "[" + ", ".join(short(x) for x in v) + "]"
        return str(v)

    return short(value)


def scaled(metric: str, value: float) -> float:
    return value * UNITS.get(metric, (1.0, metric))[0]


def label(metric: str) -> str:
    return UNITS.get(metric, (1.0, metric))[1]


def hover(p: Any, space_keys: list[str]) -> str:
    lines = [f"<b>{p.name}</b>" + (f" (reference: {p.reference})" if p.reference else "")]
    if p.alias:
        lines.append(f"alias @{p.alias}")
    if p.stopped is not None:
        lines.append(f"stopped early at epoch {p.stopped}")
    lines += [f"{k} = {fmt_setting(p.params[k])}" for k in space_keys if k in p.params]
    return "<br>".join(lines)


def write_plots(
    points: list[Any],
    objectives: list[tuple[str, str]],
    space_keys: list[str],
    out: Path,
    title: str,
    progress: list[tuple[int, float]] | None = None,
) -> list[Path]:
    """``pareto.png`` and ``pareto.html`` of the first objective against the second, and
    beside it, given ``progress`` ((epochs spent, hypervolume) after each trial that ended),
    the front's hypervolume against the compute spent."""
    (ym, _), (xm, _) = objectives[0], objectives[min(1, len(objectives) - 1)]
    groups = {
        "trials": [p for p in points if p.stopped is None and p.rank != 1 and not p.reference],
        "stopped": [p for p in points if p.stopped is not None],
        "front": sorted((p for p in points if p.rank == 1), key=lambda p: p.metrics[xm]),
        "references": [p for p in points if p.reference and p.stopped is None],
    }
    png, html = out / "pareto.png", out / "pareto.html"
    _png(groups, xm, ym, title, png, progress or [])
    _html(groups, xm, ym, title, space_keys, html, progress or [])
    return [png, html]


#: the hypervolume panel's title and axes
PROGRESS_TITLE = "hypervolume of the searched front against compute"
PROGRESS_X = "trial epochs spent"
PROGRESS_Y = "hypervolume (share of the reference box)"


def _xy(points: list[Any], xm: str, ym: str) -> tuple[list[float], list[float]]:
    return [scaled(xm, p.metrics[xm]) for p in points], [scaled(ym, p.metrics[ym]) for p in points]


def _png(
    groups: dict[str, list[Any]],
    xm: str,
    ym: str,
    title: str,
    path: Path,
    progress: list[tuple[int, float]],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if progress:
        fig, (ax, hv) = plt.subplots(1, 2, figsize=(12, 4.5), width_ratios=(7, 5))
        _progress_png(hv, progress)
    else:
        fig, ax = plt.subplots(figsize=(7, 4.5))
    kinds = _kinds(groups)
    for kind in kinds:
        members = [p for p in groups["trials"] if operator(p) == kind]
        name, colour, _ = OPERATORS[kind]
        ax.scatter(*_xy(members, xm, ym), color=colour if len(kinds) > 1 else "0.45", zorder=2,
                   label=f"trials: {name}" if len(kinds) > 1 else "trials")  # fmt: skip
    if groups["stopped"]:
        xs, ys = _xy(groups["stopped"], xm, ym)
        ax.scatter(xs, ys, c="0.75", marker="x", label="stopped early (at its rung)", zorder=1)
        for x, y, p in zip(xs, ys, groups["stopped"]):
            ax.annotate(f"ep {p.stopped}", (x, y), fontsize=7, color="0.6",
                        xytext=(3, -8), textcoords="offset points")  # fmt: skip
    if groups["references"]:
        xs, ys = _xy(groups["references"], xm, ym)
        ax.scatter(xs, ys, marker="D", s=50, facecolors="none", edgecolors="C0", zorder=5,
                   label="reference (dense, static group)")  # fmt: skip
        for x, y, p in zip(xs, ys, groups["references"]):
            if p.rank == 1:
                continue  # labelled as a front point
            ax.annotate(p.reference, (x, y), fontsize=8, color="C0",
                        xytext=(4, -10), textcoords="offset points")  # fmt: skip
    xs, ys = _xy(groups["front"], xm, ym)
    ax.step(xs, ys, where="post", c="C3", lw=1.2, zorder=3)
    faces = [OPERATORS[operator(p)][1] if len(kinds) > 1 else "C3" for p in groups["front"]]
    ax.scatter(xs, ys, c=faces, edgecolors="C3", linewidths=1.5, s=45, zorder=4,
               label="Pareto front" + (" (fill: operator)" if len(kinds) > 1 else ""))  # fmt: skip
    for x, y, p in zip(xs, ys, groups["front"]):
        ax.annotate(p.name, (x, y), fontsize=8, color="C3",
                    xytext=(4, 4), textcoords="offset points")  # fmt: skip
    ax.set(xlabel=label(xm), ylabel=label(ym), title=title)
    ax.margins(x=0.08)  # room for the labels of the extreme points
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _progress_png(ax: Any, progress: list[tuple[int, float]]) -> None:
    xs, ys = zip(*progress)
    ax.step(xs, ys, where="post", c="C2", lw=1.4)
    ax.scatter(xs, ys, c="C2", s=18, zorder=3)
    ax.set(xlabel=PROGRESS_X, ylabel=PROGRESS_Y, title=PROGRESS_TITLE)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)


def _kinds(groups: dict[str, list[Any]]) -> list[str]:
    """The operators of the searched trials and front points, in ``OPERATORS`` order."""
    seen = {operator(p) for key in ("trials", "front") for p in groups[key] if not p.reference}
    return [k for k in OPERATORS if k in seen] or ["dense"]


def _html(
    groups: dict[str, list[Any]],
    xm: str,
    ym: str,
    title: str,
    space_keys: list[str],
    path: Path,
    progress: list[tuple[int, float]],
) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    traces = _html_traces(groups, xm, ym, space_keys)
    if not progress:
        fig = go.Figure(traces)
        fig.update_layout(title=title, xaxis_title=label(xm), yaxis_title=label(ym))
        fig.write_html(path, include_plotlyjs=True)
        return
    fig = make_subplots(rows=1, cols=2, column_widths=[0.58, 0.42], horizontal_spacing=0.1,
                        subplot_titles=("", PROGRESS_TITLE))  # fmt: skip
    for trace in traces:
        fig.add_trace(trace, row=1, col=1)
    epochs, volumes = zip(*progress)
    fig.add_trace(
        go.Scatter(
            x=epochs,
            y=volumes,
            mode="lines+markers",
            line={"shape": "hv", "color": "seagreen"},
            name="front hypervolume",
            hovertemplate="%{x} epochs: hypervolume %{y:.4f}<extra></extra>",
        ),
        row=1,
        col=2,
    )
    fig.update_xaxes(title_text=label(xm), row=1, col=1)
    fig.update_yaxes(title_text=label(ym), row=1, col=1)
    fig.update_xaxes(title_text=PROGRESS_X, row=1, col=2)
    fig.update_yaxes(title_text=PROGRESS_Y, rangemode="tozero", row=1, col=2)
    fig.update_layout(title=title)
    fig.write_html(path, include_plotlyjs=True)


def _html_traces(
    groups: dict[str, list[Any]], xm: str, ym: str, space_keys: list[str]
) -> list[Any]:
    """The front panel's traces: the trials (one per operator where there are several), the
    stopped ones, the front and the references, each point hovering its settings."""
    import plotly.graph_objects as go

    style = {
        "trials": ("trials", {"color": "grey"}, "markers"),
        "stopped": ("stopped early", {"color": "lightgrey", "symbol": "x"}, "markers"),
        "front": ("Pareto front", {"color": "crimson", "size": 9}, "lines+markers"),
        "references": (
            "reference (dense, static group)",
            {"symbol": "diamond-open", "size": 12, "color": "royalblue"},
            "markers",
        ),
    }
    kinds = _kinds(groups)
    if len(kinds) > 1:  # one trace per operator instead of one grey "trials" trace
        del style["trials"]
        style["front"] = ("Pareto front (fill: operator)", *style["front"][1:])
        for kind in kinds:
            name, _, colour = OPERATORS[kind]
            groups[f"op:{kind}"] = [p for p in groups["trials"] if operator(p) == kind]
            style[f"op:{kind}"] = (f"trials: {name}", {"color": colour}, "markers")
    traces = []
    for key, (name, marker, mode) in style.items():
        xs, ys = _xy(groups[key], xm, ym)
        traces.append(
            go.Scatter(
                x=xs,
                y=ys,
                mode=mode,
                name=name,
                marker=_front_marker(groups[key], kinds) if key == "front" else marker,
                line={"shape": "hv"} if key == "front" else None,
                text=[hover(p, space_keys) for p in groups[key]],
                hovertemplate="%{text}<br>(%{x:.3g}, %{y:.3g})<extra></extra>",
            )
        )
    return traces


def _front_marker(points: list[Any], kinds: list[str]) -> dict[str, Any]:
    if len(kinds) == 1:
        return {"color": "crimson", "size": 9}
    fill = [OPERATORS[operator(p)][2] for p in points]
    return {"color": fill, "size": 10, "line": {"color": "crimson", "width": 2}}


def heading(points: list[Any], name: str) -> str:
    """``quickstart: 4 of 12 trials on the front (1 of the 3 references, 2 stopped early)``:
    of the trials that ran to the end; the references are among them."""
    ranked = [p for p in points if p.stopped is None]
    front = sum(p.rank == 1 for p in ranked)
    stopped, refs = len(points) - len(ranked), sum(bool(p.reference) for p in ranked)
    refs_on = sum(bool(p.reference) and p.rank == 1 for p in ranked)
    notes = [f"{refs_on} of the {refs} reference{'s' * (refs != 1)}"] if refs else []
    notes += [f"{stopped} stopped early"] if stopped else []
    extra = f" ({', '.join(notes)})" if notes else ""
    return f"{name}: {front} of {len(ranked)} trials on the front{extra}"


def fmt_metric(metric: str, v: float | None) -> str:
    """A metric for the table: MACs and parameters in M, accuracy in %, others 4 digits."""
    if v is None or not math.isfinite(v):
        return "-"
    if metric in (M.MACS, M.PARAMS):
        return f"{v / 1e6:.3f} M"
    if metric in (M.VAL_ACCURACY, M.TEST_ACCURACY):
        return f"{100 * v:.2f}%"
    return f"{v:.4g}"
