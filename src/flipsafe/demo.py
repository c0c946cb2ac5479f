"""The offline demo: baseline, text-guided and cosine-control models on digits."""

from __future__ import annotations

import time
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


def run_demo(out="flipsafe-demo", quick: bool = False, console: Console | None = None) -> dict:
    """Train the three demo models on digits, save them under `out`, print their accuracies."""
    from flipsafe.workflow import train_classifier

    console = console or Console()
    out = Path(out)
    config = TrainConfig(epochs=4 if quick else 15, seed=0)
    started = time.perf_counter()
    results = {}
    for name, head in DEMO_MODELS:
        _, meta, result = train_classifier(
            dataset="digits", arch=DEMO_ARCH, head=head, out=out / name, config=config,
        )
        results[name] = {"dir": str(out / name), "accuracy": result.accuracy, "head": meta["head"]}
    table = Table(title=f"digits, {DEMO_ARCH}, {config.epochs} epochs, seed {config.seed}")
    table.add_column("model")
    table.add_column("head")
    table.add_column("test accuracy", justify="right")
    for name, r in results.items():
        table.add_row(name, r["head"], f"{100 * r['accuracy']:.2f}%")
    console.print(table)
    console.print(f"models saved under {out}/ ({time.perf_counter() - started:.0f} s)")
    return results
