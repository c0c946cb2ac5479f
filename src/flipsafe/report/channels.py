"""The per-output-channel vulnerability map of a campaign as text and JSON (summary --channels)."""

from __future__ import annotations

from flipsafe.errors import ConfigError
from flipsafe.metrics.vulnerability import channel_map


def channel_rows(results, top: int | None = None) -> list[dict]:
    """The map's rows (layer, channel, n, sdc, rate, low, high), the `top` channels by SDC
    rate of each layer (all with None)."""
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise ConfigError(f"--channels takes a number of channels of at least 1, got {top!r}")
    rows = channel_map(results).to_pylist()
    if top is None:
        return rows
    seen: dict[str, int] = {}
    out = []
    for r in rows:  # sorted by layer, then rate descending
        seen[r["layer"]] = seen.get(r["layer"], 0) + 1
        if seen[r["layer"]] <= top:
            out.append(r)
    return out


def channel_text(results, top: int = 5) -> str:
    """The `top` output channels of each layer ranked by the lower end of their SDC-rate
    interval (a channel hit once stays below well-sampled ones), as lines."""
    confidence = results.plan.confidence
    lines = [(f"Output channels most likely to turn a fault into an SDC ({top} per layer, "
              f"ranked by the lower end of their {confidence:.0%} Wilson interval)"),
             f"{'layer':<24} {'channel':>7} {'faults':>7} {'SDC':>5} {'rate':>8}  interval"]
    for r in channel_rows(results, top):
        lines.append(f"{r['layer']:<24} {r['channel']:>7} {r['n']:>7} {r['sdc']:>5} "
                     f"{r['rate']:>8.2%}  [{r['low']:.2%}, {r['high']:.2%}]")
    return "\n".join(lines)
