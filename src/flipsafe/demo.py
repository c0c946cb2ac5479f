"""The offline demo: train baseline, text-guided and cosine-control models on digits,
run last-layer and all-layer campaigns with and without range clamping, replay them under
hardening (ranger, abft, dup, ecc) with its cost, write the reports."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from flipsafe.errors import ConfigError
from flipsafe.train import TrainConfig

DEMO_ARCH = "resnet20"
DEMO_DATASET = "digits"
# Training results depend on the CPU thread count (it changes how sums are split), so the
# demo pins it: the same machine then retrains the same weights.
DEMO_THREADS = 4
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


@dataclass(frozen=True)
class DemoHardening:
    """A hardening comparison: one plan replayed unprotected and under each protection, on
    the baseline and the text-guided model. `seed` differs from the campaigns whose rows
    choose what `dup` duplicates (map=), so selection and evaluation use other faults."""

    name: str
    site: str
    layers: str
    n: int
    seed: int
    protections: tuple[str, ...]


HARDENED_MODELS = ("baseline", "text-guided")


def demo_hardening(quick: bool) -> tuple[DemoHardening, ...]:
    last, every, weights = (600, 60, 400) if quick else (3000, 300, 2000)
    return (
        DemoHardening("hardening-last-layer", "activations", "last", last, 1,
                      ("ranger", "abft", "dup:layers=last")),
        DemoHardening("hardening-all-layers", "activations", "all", every, 1,
                      ("ranger", "abft", "dup:budget=10%:map={map}")),
        DemoHardening("hardening-weights", "weights", "last", weights, 1, ("ecc",)),
    )


def _recipe_differences(config: dict, head: str, recipe: TrainConfig) -> list[str]:
    """How a saved checkpoint's config differs from what the demo would train now."""
    wanted = {"arch": DEMO_ARCH, "dataset": DEMO_DATASET, "head_spec": head,
              "train": json.loads(json.dumps(recipe.to_dict()))}
    diffs = []
    for key, now in wanted.items():
        there = config.get(key)
        if key == "train" and isinstance(there, dict):
            diffs += [f"{k} {there.get(k)!r} there, {v!r} now" for k, v in now.items()
                      if there.get(k) != v]
        elif there != now:
            diffs.append(f"{key} {there!r} there, {now!r} now")
    if not isinstance(config.get("accuracy"), (int, float)):
        diffs.append("no recorded accuracy")
    return diffs


def demo_models(out, config: TrainConfig, console: Console) -> dict:
    """Train the demo's models under out/models, reusing those a previous run trained with
    the same recipe; a model trained otherwise is refused before anything is trained."""
    from flipsafe import checkpoint
    from flipsafe.workflow import train_classifier

    out = Path(out)
    reuse = set()
    for name, head in DEMO_MODELS:
        folder = out / "models" / name
        if not checkpoint.exists(folder):
            continue
        diffs = _recipe_differences(checkpoint.read_config(folder), head, config)
        if diffs:
            raise ConfigError(
                f"{folder} holds a model the demo trained with other settings "
                f"({'; '.join(diffs)}); rerun with those settings, choose another --out, "
                f"or remove {out} to start over"
            )
        reuse.add(name)
    models = {}
    for name, head in DEMO_MODELS:
        folder = out / "models" / name
        if name in reuse:
            meta = checkpoint.load_checkpoint(folder).config  # checks the weights' hash
            accuracy = float(meta["accuracy"])
            console.print(f"reusing {folder}: trained by an earlier demo run with these settings")
        else:
            _, meta, result = train_classifier(
                dataset=DEMO_DATASET, arch=DEMO_ARCH, head=head, out=folder, config=config,
            )
            accuracy = result.accuracy
        models[name] = {"dir": folder, "accuracy": accuracy, "head": meta["head"]}
    return models


def run_demo(out="flipsafe-demo", quick: bool = False, console: Console | None = None,
             threads: int | None = DEMO_THREADS) -> dict:
    """Train the demo models, run their campaigns and write report.html under `out`.

    Models a previous run trained into `out` with the same settings are reused, so a
    rerun resumes its campaigns. torch runs on `threads` CPU threads meanwhile (None:
    leave torch's setting), which makes training repeatable on one machine.
    """
    import torch

    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_demo(Path(out), quick, console or Console())
    finally:
        torch.set_num_threads(before)


def _run_demo(out: Path, quick: bool, console: Console) -> dict:
    import torch

    from flipsafe.campaign.runner import make_plan, run_campaign
    from flipsafe.report import load_results, summary_table, write_report

    config = TrainConfig(epochs=3 if quick else 6, seed=0)
    started = time.perf_counter()
    models = demo_models(out, config, console)
    trained = time.perf_counter()
    _print_accuracies(console, models, config, torch.get_num_threads())

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
    hardened = _run_hardening(out, quick, models, campaigns, console)
    injected = time.perf_counter()

    # One report per campaign: a report compares models under a single plan.
    reports = {c.name: write_report(campaigns[c.name], out / report_name(c.name),
                                    names=list(models))
               for c in demo_campaigns(quick)}
    for h in demo_hardening(quick):
        folders = hardened[h.name]
        reports[h.name] = write_report(list(folders.values()), out / report_name(h.name),
                                       names=list(folders))
    console.print(
        f"training {trained - started:.0f} s, campaigns {injected - trained:.0f} s, "
        f"total {time.perf_counter() - started:.0f} s"
    )
    for name, path in reports.items():
        console.print(f"report ({name}): {path}", highlight=False)
    return {"models": models, "campaigns": campaigns, "report": reports["last-layer"],
            "reports": reports}


def _run_hardening(out: Path, quick: bool, models: dict, campaigns: dict,
                   console: Console) -> dict:
    """Run every hardening comparison; returns {comparison: {label: results folder}} with
    each model's unprotected campaign first."""
    from flipsafe.campaign.runner import make_plan, run_campaign
    from flipsafe.report import load_results
    from flipsafe.report.tables import protection_table

    done = {}
    for h in demo_hardening(quick):
        folders = {}
        for name in (n for n in HARDENED_MODELS if n in models):
            # dup chooses its channels from the all-layer campaign of another seed.
            source = dict(zip(models, campaigns.get("all-layers", ())))
            for spec in ("", *h.protections):
                spec = spec.format(map=source.get(name, ""))
                plan = make_plan(models[name]["dir"], site=h.site, layers=h.layers, n=h.n,
                                 format="fp32", fault="bitflip", seed=h.seed,
                                 protect=spec or None)
                label = f"{name}+{spec.split(':')[0]}" if spec else name
                folder = out / "campaigns" / h.name / label.replace("+", "-")
                run_campaign(plan, folder, show_progress=True)
                folders[label] = folder
        console.rule(f"{h.name}: fp32 single-bit flips in the {h.site} of layers {h.layers!r}, "
                     f"replayed under {', '.join(p.split(':')[0] for p in h.protections)}")
        results = [load_results(f) for f in folders.values()]
        print(protection_table(results[0], vs=results[1:]).render_text(), flush=True)
        done[h.name] = folders
    return done


def report_name(campaign: str) -> str:
    """The demo's report file for a campaign: report.html for the last layer, as before."""
    return "report.html" if campaign == "last-layer" else f"report-{campaign}.html"


def _print_accuracies(console: Console, models: dict, config: TrainConfig, threads: int) -> None:
    table = Table(title=f"{DEMO_DATASET}, {DEMO_ARCH}, {config.epochs} epochs, seed "
                        f"{config.seed}, {threads} CPU threads")
    table.add_column("model")
    table.add_column("head")
    table.add_column("test accuracy", justify="right")
    for name, r in models.items():
        table.add_row(name, r["head"], f"{100 * r['accuracy']:.2f}%")
    console.print(table)
