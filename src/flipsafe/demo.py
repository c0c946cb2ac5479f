"""The offline demo: train baseline, text-guided and cosine-control models on digits,
run last-layer and all-layer campaigns with and without range clamping, write a report."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from flipsafe.train import TrainConfig

DEMO_ARCH = "resnet20"
DEMO_MODELS = (
    ("baseline", "linear"),
    ("text-guided", "text:minilm"),
    ("cosine-control", "cosine"),
)


@dataclass(frozen=True)
class DemoCampaign:
    """One campaign the demo runs on every model."""

    name: str
    layers: str
    n: int
    clamp: str


def demo_campaigns(quick: bool) -> tuple[DemoCampaign, ...]:
    last, every = (600, 60) if quick else (3000, 300)
    return (
        DemoCampaign("last-layer", "last", last, "none"),
        DemoCampaign("last-layer-clamped", "last", last, "profiled"),
        DemoCampaign("all-layers", "all", every, "none"),
        DemoCampaign("all-layers-clamped", "all", every, "profiled"),
    )


def run_demo(out="flipsafe-demo", quick: bool = False, console: Console | None = None) -> dict:
    """Train the demo models, run their campaigns and write one report per campaign under
    `out` (report.html for the last layer, report-<campaign>.html for the others)."""
    from flipsafe.campaign.runner import make_plan, run_campaign
    from flipsafe.report import load_results, summary_table, write_report
    from flipsafe.workflow import train_classifier

    console = console or Console()
    out = Path(out)
    config = TrainConfig(epochs=3 if quick else 6, seed=0)
    started = time.perf_counter()
    models = {}
    for name, head in DEMO_MODELS:
        _, meta, result = train_classifier(
            dataset="digits", arch=DEMO_ARCH, head=head, out=out / "models" / name, config=config,
        )
        models[name] = {"dir": out / "models" / name, "accuracy": result.accuracy, "head": meta["head"]}
    trained = time.perf_counter()
    _print_accuracies(console, models, config)

    campaigns = {}
    for c in demo_campaigns(quick):
        folders = []
        for name, m in models.items():
            plan = make_plan(m["dir"], site="activations", layers=c.layers, n=c.n, clamp=c.clamp,
                             format="fp32", fault="bitflip", seed=0)
            folder = out / "campaigns" / c.name / name
            run_campaign(plan, folder, show_progress=True)
            folders.append(folder)
        campaigns[c.name] = folders
        results = [load_results(f) for f in folders]
        console.rule(f"{c.name}: fp32 single-bit flips in activations, clamp={c.clamp}")
        print(summary_table(results[0], vs=results[1:]), flush=True)
    injected = time.perf_counter()

    # One report per campaign: a report compares models under a single plan.
    reports = {c.name: write_report(campaigns[c.name], out / report_name(c.name),
                                    names=list(models))
               for c in demo_campaigns(quick)}
    console.print(
        f"training {trained - started:.0f} s, campaigns {injected - trained:.0f} s, "
        f"total {time.perf_counter() - started:.0f} s"
    )
    for name, path in reports.items():
        console.print(f"report ({name}): {path}", highlight=False)
    return {"models": models, "campaigns": campaigns, "report": reports["last-layer"],
            "reports": reports}


def report_name(campaign: str) -> str:
    """The demo's report file for a campaign: report.html for the last layer, as before."""
    return "report.html" if campaign == "last-layer" else f"report-{campaign}.html"


def _print_accuracies(console: Console, models: dict, config: TrainConfig) -> None:
    table = Table(title=f"digits, {DEMO_ARCH}, {config.epochs} epochs, seed {config.seed}")
    table.add_column("model")
    table.add_column("head")
    table.add_column("test accuracy", justify="right")
    for name, r in models.items():
        table.add_row(name, r["head"], f"{100 * r['accuracy']:.2f}%")
    console.print(table)
