"""Report figures (matplotlib, Agg, readable in greyscale) rendered to PNG bytes."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import matplotlib
import matplotlib.patheffects as path_effects
import numpy as np
import pyarrow.compute as pc
from matplotlib.figure import Figure

from flipsafe.errors import FlipsafeError
from flipsafe.metrics.calibration import ReliabilityBins, reliability_bins
from flipsafe.metrics.stats import Summary, summarise
from flipsafe.protect.spec import label as protection_label
from flipsafe.report.results import LAST, Results, with_bit_column

# Colours differ in lightness as well as hue, and each model also gets its own marker,
# line style and hatch, so the plots survive greyscale printing.
STYLES = (
    {"color": "#000000", "marker": "o", "linestyle": "-", "hatch": ""},
    {"color": "#E69F00", "marker": "s", "linestyle": "--", "hatch": "//"},
    {"color": "#0072B2", "marker": "^", "linestyle": ":", "hatch": ".."},
    {"color": "#8C8C8C", "marker": "D", "linestyle": "-.", "hatch": "xx"},
)
HEATMAP = "cividis"  # lightness rises monotonically with the value
MARGIN_EDGES = (0.0, 1.0, 5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 100.0)
DPI = 110


def style(i: int) -> dict:
    return STYLES[i % len(STYLES)]


def to_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def _pct(x) -> np.ndarray:
    return 100.0 * np.asarray(x, dtype=np.float64)


# Whiskers get a white outline so they stay visible over a bar of any colour.
_HALO = [path_effects.Stroke(linewidth=3.2, foreground="white"), path_effects.Normal()]


def _whiskers(ax, x, y, xerr=None, yerr=None) -> None:
    """Black interval whiskers with caps, outlined in white and drawn above everything."""
    bars = ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="none", ecolor="black", elinewidth=1.2,
                       capsize=3, capthick=1.2, zorder=5)
    for artist in (*bars.lines[1], *bars.lines[2]):
        artist.set_path_effects(_HALO)


def interval_words(results: Results) -> str:
    return f"whiskers: {100 * results.by_layer.confidence:g}% Wilson interval"


def _errors(groups) -> tuple[np.ndarray, np.ndarray]:
    """Rates and asymmetric error bars (in %) from GroupSummary objects."""
    rate = _pct([g.sdc.rate for g in groups])
    low = _pct([g.sdc.low for g in groups])
    high = _pct([g.sdc.high for g in groups])
    return rate, np.vstack([rate - low, high - rate])


def format_bits(results: Results) -> tuple[int, dict[str, tuple[int, ...]]]:
    """Width of one element code and its fields, from the plan's format when it is known."""

    bits = with_bit_column(results.table)["bit"].to_numpy()
    observed = int(bits.max()) + 1 if bits.size else 0
    try:
        fmt = site_codes(results.plan)
    except FlipsafeError:
        return observed, {}
    return max(observed, int(fmt.bits)), dict(fmt.fields)


def site_codes(plan):
    """What the plan's faults flip bits of, shaped as a format (inject.sites.Site.codes,
    read from the plan): the format, its codes in memory words, or a PE's registers."""
    from flipsafe import accel, formats
    from flipsafe.formats.words import WordLayout

    fmt = formats.get(plan.format)
    if plan.word_bits:
        return WordLayout(fmt, plan.word_bits)
    if plan.accelerator:
        return accel.codes(accel.parse(plan.accelerator), fmt)
    return fmt


def layer_sdc_figure(models: Sequence[Results]) -> Figure:
    """Per-layer SDC rate with interval whiskers, models side by side (layers matched)."""
    layers: list[str] = []
    for r in models:
        layers += [k[0] for k in r.matched.groups if k[0] not in layers]
    m = len(models)
    height = 0.8 / m
    fig = Figure(figsize=(9, 1.4 + 0.28 * len(layers) * m))
    ax = fig.add_subplot()
    y = np.arange(len(layers), dtype=np.float64)
    for i, r in enumerate(models):
        present = [j for j, name in enumerate(layers) if (name,) in r.matched.groups]
        groups = [r.matched.groups[(layers[j],)] for j in present]
        rate, err = _errors(groups)
        s = style(i)
        at = y[present] - 0.4 + height * (i + 0.5)
        ax.barh(at, rate, height=height, color=s["color"], hatch=s["hatch"],
                edgecolor="black", linewidth=0.6, label=r.name)
        _whiskers(ax, rate, at, xerr=err)
    ax.set_yticks(y, [_layer_label(name, models) for name in layers])
    ax.invert_yaxis()
    ax.set_xlabel(f"SDC rate (%), {interval_words(models[0])}")
    ax.set_xlim(left=0)
    ax.grid(axis="x", color="#dddddd")
    ax.set_axisbelow(True)
    ax.legend(loc="best", fontsize="small")
    ax.set_title("SDC rate per layer")
    return fig


def _layer_label(match: str, models: Sequence[Results]) -> str:
    if match == LAST:
        return f"{models[0].real_name(LAST) if len(models) == 1 else LAST} (classifier)"
    having = [r for r in models if (match,) in r.matched.groups]
    if len(having) == len(models):
        return match
    return f"{having[0].real_name(match)} ({', '.join(r.name for r in having)} only)"


def bit_heatmap_figure(models: Sequence[Results] | Results, vmax: float | None = None) -> Figure:
    """SDC rate (%) by layer and bit position, one panel per model stacked on one bit axis
    (so the panels line up whatever their layer names) with one colour scale for all:
    equal colours mean equal rates across models. Grey cells had no injections."""
    if isinstance(models, Results):
        models = [models]
    width, fields = format_bits(models[0])
    for r in models[1:]:
        width = max(width, format_bits(r)[0])
    panels = []
    for r in models:
        layers = [k[0] for k in r.by_layer.groups]
        grid = np.full((len(layers), width), np.nan)
        for (layer, bit), g in r.by_bit.groups.items():
            grid[layers.index(layer), bit] = 100.0 * g.sdc.rate
        names = [f"{name} (classifier)" if name == r.classifier_layer else name
                 for name in layers]
        panels.append((r, grid, names))
    if vmax is None:
        vmax = max([float(np.nanmax(g)) for _, g, _ in panels if np.isfinite(g).any()] + [1e-9])
    rows = [max(1, len(names)) for _, _, names in panels]
    # Sizes in inches: 0.32 per layer row, a gap for each panel's title, margins for the
    # figure title and field names above and the bit axis below.
    row_in, gap_in, top_in, bottom_in = 0.32, 0.45, 1.05, 0.6
    height = row_in * sum(rows) + gap_in * (len(panels) - 1) + top_in + bottom_in
    fig = Figure(figsize=(10, height))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False,
                        gridspec_kw={"height_ratios": rows})
    fig.subplots_adjust(top=1 - top_in / height, bottom=bottom_in / height,
                        hspace=gap_in / (row_in * sum(rows) / len(panels)))
    cmap = matplotlib.colormaps[HEATMAP].with_extremes(bad="#d9d9d9")
    for k, (ax, (r, grid, names)) in enumerate(zip(axes[:, 0], panels)):
        image = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=0, vmax=vmax,
                          interpolation="nearest")
        ax.set_yticks(np.arange(len(names)), names)
        # The first panel's title sits above the field names.
        ax.set_title(r.name, loc="left", fontweight="bold", fontsize="medium",
                     pad=18 if k == 0 else 4)
        _mark_fields(ax, fields, heat=True, names=k == 0)
    ticks = list(range(0, width, 4 if width > 16 else 1))
    axes[-1, 0].set_xticks(ticks, [str(t) for t in ticks])
    axes[-1, 0].set_xlabel("bit position (0 = least significant)")
    fig.colorbar(image, ax=list(axes[:, 0]), label="SDC rate (%)", pad=0.01)
    fig.suptitle("SDC rate by layer and bit", y=1 - 0.12 / height, va="top")
    return fig


def _mark_fields(ax, fields: dict[str, tuple[int, ...]], heat: bool, names: bool = True) -> None:
    """Field boundaries as lines, and (if names) field names above the axes."""
    for name, positions in fields.items():
        if not positions:
            continue
        lo, hi = min(positions), max(positions)
        ax.axvline(lo - 0.5, color="white" if heat else "#999999", linewidth=1.2)
        if not names:
            continue
        ax.text((lo + hi) / 2, 1.01, name, transform=ax.get_xaxis_transform(), ha="center",
                va="bottom", fontsize="small")


def bits_summary(results: Results) -> Summary:
    """Rows with at least one bit, summarised by their highest bit over all layers."""
    rows = with_bit_column(results.table)
    rows = rows.filter(pc.greater_equal(rows["bit"], 0))
    return summarise(rows, ("bit",), results.by_layer.confidence)


def bit_curves_figure(models: Sequence[Results]) -> Figure:
    """SDC rate by bit position over all layers, one curve per model."""
    width, fields = format_bits(models[0])
    fig = Figure(figsize=(10, 3.8))
    ax = fig.add_subplot()
    for i, r in enumerate(models):
        s = bits_summary(r)
        if not s.groups:
            continue
        bits = np.array([k[0] for k in s.groups], dtype=np.float64)
        order = np.argsort(bits)
        rate, err = _errors(list(s.groups.values()))
        st = style(i)
        # A small sideways offset keeps overlapping whiskers apart.
        ax.errorbar(bits[order] + 0.12 * (i - (len(models) - 1) / 2), rate[order],
                    yerr=err[:, order], color=st["color"], marker=st["marker"],
                    linestyle=st["linestyle"], markersize=4, capsize=2, linewidth=1.2,
                    label=r.name)
    _mark_fields(ax, fields, heat=False)
    ax.set_xlim(-0.7, width - 0.3)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("bit position (0 = least significant); multi-bit faults count at their "
                  "highest bit")
    ax.set_ylabel(f"SDC rate (%)\n{interval_words(models[0])}")
    ax.grid(color="#e5e5e5")
    ax.legend(loc="upper left", fontsize="small")
    ax.set_title("SDC rate by bit position, all injected layers", pad=18)
    return fig


def delta_loss_figure(models: Sequence[Results]) -> Figure:
    """Distribution of |delta loss| on a log axis; zeros and non-finite values are counted."""
    values = []
    for r in models:
        x = r.table["delta_loss"].to_numpy()
        values.append(np.abs(x[np.isfinite(x) & (x != 0)]))
    fig = Figure(figsize=(9, 3.8))
    ax = fig.add_subplot()
    pooled = np.concatenate(values) if values else np.array([])
    if pooled.size:
        lo, hi = float(pooled.min()), float(pooled.max())
        edges = np.logspace(math.log10(lo), math.log10(hi) + 1e-9, 60) if hi > lo else \
            np.array([lo / 2, lo * 2])
        for i, (r, v) in enumerate(zip(models, values)):
            st = style(i)
            x = r.table["delta_loss"].to_numpy()
            zero = int(np.count_nonzero(x == 0))
            bad = int(np.count_nonzero(~np.isfinite(x)))
            ax.hist(v, bins=edges, weights=np.full(v.size, 100.0 / r.n), histtype="step",
                    color=st["color"], linestyle=st["linestyle"], linewidth=1.5,
                    label=f"{r.name} ({zero:,} zero, {bad:,} non-finite not shown)")
        ax.set_xscale("log")
    ax.set_xlabel("|ΔLoss| (log scale)")
    ax.set_ylabel("% of injections")
    ax.grid(color="#e5e5e5")
    ax.legend(loc="upper center", fontsize="small", bbox_to_anchor=(0.5, -0.18), ncol=1,
              frameon=False)
    ax.set_title("ΔLoss per injection")
    return fig


def margin_bins(results: Results) -> Summary:
    """Rows summarised by bins of the golden top2diff (top-1 minus top-2 probability, x100)."""
    margin = results.table["golden_top2diff"].to_numpy()
    keep = np.isfinite(margin)
    index = np.clip(np.searchsorted(MARGIN_EDGES, margin[keep], side="left") - 1, 0,
                    len(MARGIN_EDGES) - 2)
    rows = results.table.filter(keep).append_column("margin_bin", [index.astype(np.int64)])
    return summarise(rows, ("margin_bin",), results.by_layer.confidence)


def margin_label(i: int) -> str:
    return f"{MARGIN_EDGES[i]:g}-{MARGIN_EDGES[i + 1]:g}"


def margin_figure(models: Sequence[Results]) -> Figure:
    """SDC probability against the golden top-1/top-2 margin, one curve per model."""
    n_bins = len(MARGIN_EDGES) - 1
    fig = Figure(figsize=(9, 3.6))
    ax = fig.add_subplot()
    for i, r in enumerate(models):
        s = margin_bins(r)
        if not s.groups:
            continue
        bins = np.array([k[0] for k in s.groups])
        order = np.argsort(bins)
        rate, err = _errors(list(s.groups.values()))
        st = style(i)
        ax.errorbar(bins[order] + 0.08 * (i - (len(models) - 1) / 2), rate[order],
                    yerr=err[:, order], color=st["color"], marker=st["marker"],
                    linestyle=st["linestyle"], capsize=3, linewidth=1.2, label=r.name)
    ax.set_xticks(np.arange(n_bins), [margin_label(i) for i in range(n_bins)])
    ax.set_xlim(-0.5, n_bins - 0.5)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("golden top2diff: (p_top1 - p_top2) x 100 of the clean softmax")
    ax.set_ylabel(f"SDC rate (%)\n{interval_words(models[0])}")
    ax.grid(color="#e5e5e5")
    ax.legend(fontsize="small")
    ax.set_title("How a confident margin protects: SDC rate by clean margin")
    return fig


def reliability(results: Results, n_bins: int = 15) -> ReliabilityBins | None:
    if results.clean is None:
        return None
    return reliability_bins(results.clean.probs, results.clean.labels, n_bins)


def reliability_figure(models: Sequence[Results], n_bins: int = 15) -> Figure | None:
    """Reliability diagram per model: accuracy against confidence on clean test images, with
    the number of images per bin underneath (a sparse bin's accuracy means little)."""
    pairs = [(r, reliability(r, n_bins)) for r in models]
    pairs = [(r, b) for r, b in pairs if b is not None]
    if not pairs:
        return None
    fig = Figure(figsize=(3.2 * len(pairs) + 0.6, 4.6))
    axes = fig.subplots(2, len(pairs), squeeze=False, sharex=True,
                        gridspec_kw={"height_ratios": [3, 1], "hspace": 0.08})
    for i, (r, b) in enumerate(pairs):
        top, bottom = axes[0, i], axes[1, i]
        st = style(i)
        centres = (b.edges[:-1] + b.edges[1:]) / 2
        widths = np.diff(b.edges)
        filled = b.count > 0
        top.bar(centres[filled], b.accuracy[filled], width=widths[filled], color=st["color"],
                hatch=st["hatch"], edgecolor="black", linewidth=0.5, alpha=0.85,
                label="accuracy")
        top.plot([0, 1], [0, 1], color="#555555", linestyle="--", linewidth=1,
                 label="perfect calibration")
        top.plot(b.confidence[filled], b.accuracy[filled], linestyle="none", marker="o",
                 markersize=3, color="#555555", label="bin (mean confidence, accuracy)")
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_title(r.name, fontsize="medium")
        bottom.bar(centres, b.count, width=widths, color="#bbbbbb", edgecolor="black",
                   linewidth=0.5)
        bottom.set_yscale("log")
        bottom.set_ylim(0.8, max(2, b.count.max()) * 1.5)
        bottom.set_xlabel("confidence (top-1 probability)")
        if i == 0:
            top.set_ylabel("accuracy")
            bottom.set_ylabel("images")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize="small", frameon=False,
               bbox_to_anchor=(0.5, -0.06))
    fig.suptitle("Reliability on clean test images", y=0.98)
    return fig


PARETO_AXES = (("flops", "FLOP overhead (%)"), ("latency", "latency overhead (%), CPU emulation"))
PARETO_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p")


def pareto_groups(entries: Sequence[dict]) -> dict[str, list[dict]]:
    """Protection entries (report.tables.protections) by model: each under the name of the
    unprotected campaign it is compared with (its own name when it has none)."""
    groups: dict[str, list[dict]] = {}
    for e in entries:
        ref = e["reference"] if e["reference"] is not None else e["campaign"]
        groups.setdefault(ref.name, []).append(e)
    # A model with nothing to compare ('none' alone) is left out, unless every model is so.
    compared = {k: g for k, g in groups.items() if len(g) > 1}
    return compared or groups


def _front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both overhead and SDC rate, by overhead."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def pareto_figure(entries: Sequence[dict]) -> Figure:
    """SDC rate (with its interval) against FLOP and latency overhead: a row of two panels
    per model (pareto_groups), one labelled marker per protection, 'none' included; a dashed
    line joins the protections no other beats on both axes. Protections whose overhead was
    not recorded are named under the panel."""
    groups = pareto_groups(entries)
    fig = Figure(figsize=(10, 0.6 + 3.6 * len(groups)))
    axes = fig.subplots(len(groups), len(PARETO_AXES), squeeze=False)
    markers: dict[str, str] = {}
    for row, (model, group) in zip(axes, groups.items()):
        for ax, (key, label) in zip(row, PARETO_AXES):
            points, missing = [], []
            for e in group:
                name = protection_label(e["protection"])
                marker = markers.setdefault(name, PARETO_MARKERS[len(markers)
                                                                 % len(PARETO_MARKERS)])
                x = e[key]
                if x is None or not math.isfinite(x):
                    missing.append(name)
                    continue
                sdc = e["sdc"]
                rate, err = _errors([_Rate(sdc)])
                colour = {"none": "black", "text-guided head": "#E69F00"}.get(name, "#0072B2")
                ax.plot([100 * x], rate, marker=marker, color=colour, markersize=8,
                        linestyle="none", zorder=6)
                _whiskers(ax, [100 * x], rate, yerr=err)
                ax.annotate(name, (100 * x, rate[0]), textcoords="offset points", xytext=(6, 5),
                            fontsize="small")
                points.append((100 * x, float(rate[0])))
            if len({x for x, _ in points}) == 1:
                ax.set_xlim(points[0][0] - 5, points[0][0] + 5)
            front = _front(points)
            if len(front) > 1:
                ax.plot(*zip(*front), linestyle="--", color="#8C8C8C", zorder=4)
            if missing:
                ax.text(0.0, -0.22, f"not recorded: {', '.join(missing)}",
                        transform=ax.transAxes, fontsize="small", va="top")
            ax.set_xlabel(label)
            ax.set_ylabel("SDC rate (%)")
            ax.set_ylim(bottom=0)
            ax.grid(color="#dddddd")
            ax.set_axisbelow(True)
            ax.set_title(model, loc="left", fontweight="bold", fontsize="medium")
    fig.suptitle("SDC rate against what each protection costs (lower left is better)")
    fig.tight_layout()
    return fig


class _Rate:
    """A RateEstimate in the shape _errors reads (a group with .sdc)."""

    def __init__(self, sdc):
        self.sdc = sdc


def attack_figure(attacks: Sequence[dict]) -> Figure:
    """Test accuracy after each flip of each attack (flipsafe.attack records), flip 0 the
    clean model, with the target as a dotted line."""
    fig = Figure(figsize=(9, 4))
    ax = fig.add_subplot()
    for i, a in enumerate(attacks):
        r, s = a["attack"], style(i)
        acc = [r["clean_accuracy"], *r["accuracy"]]
        ax.plot(range(len(acc)), _pct(acc), marker="o", markersize=3, color=s["color"],
                label=f"{a['name']} ({r['plan']['format']})")
        ax.axhline(100 * r["target_accuracy"], color=s["color"], linestyle=":", linewidth=0.8)
    ax.set_xlabel("bit flips (chosen by the progressive bit search)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(color="#dddddd")
    ax.set_axisbelow(True)
    ax.legend(loc="best", fontsize="small")
    ax.set_title("Worst case: accuracy after each flip (dotted: target)")
    return fig


def census_figure(census: dict) -> Figure:
    """Share of each layer's weights whose single flip of each census bit is catastrophic
    (flipsafe.attack.census), one bar per (layer, bit)."""
    rows = census["layers"]
    labels = [f"{r['layer']} (bit {r['bit']})" for r in rows]
    fig = Figure(figsize=(9, 1.4 + 0.3 * len(rows)))
    ax = fig.add_subplot()
    y = np.arange(len(rows), dtype=np.float64)
    ax.barh(y, [100 * r["share"] for r in rows], color=style(0)["color"], edgecolor="black",
            linewidth=0.6)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel(f"weights whose one flip costs more than {100 * census['drop']:.0f} points "
                  "of accuracy (%)")
    ax.grid(axis="x", color="#dddddd")
    ax.set_axisbelow(True)
    ax.set_title(f"Catastrophic bits, {census['format']}")
    return fig
