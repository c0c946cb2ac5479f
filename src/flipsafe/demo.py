"""The paper's study in one command: train baseline, text-guided and cosine-control models
(digits and resnet20 by default, offline; any dataset, backbone and text encoder flipsafe
trains), run last-layer and all-layer campaigns with and without range clamping, replay
them under hardening (ranger, abft, dup, ecc) with its cost, write the reports.

The log is short and fits 80 columns: one progress bar per training and per campaign,
naming the model, and the verdicts; the tables are in the reports."""

from __future__ import annotations

import json
import textwrap
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
DEMO_ENCODER = "minilm"
TEXT_HEAD = "text"  # in DEMO_MODELS: the text head of the study's encoder
DEMO_MODELS = (
    ("baseline", "linear"),
    ("text-guided", TEXT_HEAD),
    ("cosine-control", "cosine"),
)
CLASS_EMBEDDINGS = "class-embeddings.safetensors"  # under out/models, for other encoders
LOG_WIDTH = 80


@dataclass(frozen=True)
class DemoStudy:
    """What the demo studies: a dataset spec, a backbone, the text encoder of the
    text-guided head (see flipsafe.textguided.encoders) and where torch runs."""

    dataset: str = DEMO_DATASET
    arch: str = DEMO_ARCH
    encoder: str = DEMO_ENCODER
    device: str = "cpu"

    def check(self) -> None:
        """Refuse (ConfigError) a backbone or text encoder that cannot work, before
        anything is trained."""
        from flipsafe.models import check_arch
        from flipsafe.textguided.encoders import check_encoder_spec

        check_arch(self.arch)
        check_encoder_spec(self.encoder)

    def models(self, out: Path) -> tuple[tuple[str, str], ...]:
        """(name, head spec) of DEMO_MODELS; a text encoder other than minilm embeds the
        classes into out/models/CLASS_EMBEDDINGS first."""
        text = ("text:minilm" if self.encoder == DEMO_ENCODER
                else f"text:{Path(out) / 'models' / CLASS_EMBEDDINGS}")
        return tuple((name, text if head == TEXT_HEAD else head) for name, head in DEMO_MODELS)


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


def _recipe_differences(config: dict, head: str, recipe: TrainConfig,
                        study: DemoStudy) -> list[str]:
    """How a saved checkpoint's config differs from what the demo would train now."""
    wanted = {"arch": study.arch, "dataset": study.dataset, "head_spec": head,
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


def demo_models(out, config: TrainConfig, console: Console,
                study: DemoStudy = DemoStudy()) -> dict:
    """Train the demo's models under out/models, reusing those a previous run trained with
    the same recipe; a model trained otherwise is refused before anything is trained."""
    from flipsafe import checkpoint
    from flipsafe.campaign.runner import resolve_device
    from flipsafe.workflow import train_classifier

    out = Path(out)
    study.check()
    device = resolve_device(study.device)
    reuse = set()
    for name, head in study.models(out):
        folder = out / "models" / name
        if not checkpoint.exists(folder):
            continue
        diffs = _recipe_differences(checkpoint.read_config(folder), head, config, study)
        if diffs:
            raise ConfigError(
                f"{folder} holds a model the demo trained with other settings "
                f"({'; '.join(diffs)}); rerun with those settings, choose another --out, "
                f"or remove {out} to start over"
            )
        reuse.add(name)
    models = {}
    for name, head in study.models(out):
        folder = out / "models" / name
        if name in reuse:
            meta = checkpoint.load_checkpoint(folder).config  # checks the weights' hash
            accuracy = float(meta["accuracy"])
            console.print(f"reusing {folder} (trained by an earlier run with these settings)",
                          highlight=False)
        else:
            if head.startswith("text:") and study.encoder != DEMO_ENCODER:
                _embed_classes(out, study, console)
            _, meta, result = train_classifier(
                dataset=study.dataset, arch=study.arch, head=head, out=folder, config=config,
                device=device, label=f"train {name}",
            )
            accuracy = result.accuracy
        models[name] = {"dir": folder, "accuracy": accuracy, "head": meta["head"]}
    return models


def _embed_classes(out: Path, study: DemoStudy, console: Console) -> None:
    """Class embeddings of the study's dataset with its encoder, for the text-guided head."""
    from flipsafe import textguided as tg
    from flipsafe.data import load as load_data
    from flipsafe.workflow import embed_classes

    path = out / "models" / CLASS_EMBEDDINGS
    path.parent.mkdir(parents=True, exist_ok=True)
    emb = embed_classes(study.dataset, load_data(study.dataset).classes, study.encoder)
    tg.save_embeddings(emb, path)
    console.print(f"class embeddings ({study.encoder}): {path}", highlight=False)


def run_demo(out="flipsafe-demo", quick: bool = False, console: Console | None = None,
             threads: int | None = DEMO_THREADS, study: DemoStudy | None = None) -> dict:
    """Train the demo models, run their campaigns and write report.html under `out`.

    `study` says which dataset, backbone, text encoder and device (default: digits,
    resnet20, minilm, cpu). Models a previous run trained into `out` with the same
    settings are reused, so a rerun resumes its campaigns. torch runs on `threads` CPU
    threads meanwhile (None: leave torch's setting), which makes training repeatable on
    one machine.
    """
    import torch

    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_demo(Path(out), quick, console or Console(width=LOG_WIDTH),
                         study or DemoStudy())
    finally:
        torch.set_num_threads(before)


def _run_demo(out: Path, quick: bool, console: Console, study: DemoStudy) -> dict:
    import torch

    from flipsafe.campaign.runner import make_plan, resolve_device, run_campaign
    from flipsafe.report import load_results, write_report
    from flipsafe.report.tables import brief_lines

    config = TrainConfig(epochs=3 if quick else 6, seed=0)
    device = resolve_device(study.device)
    started = time.perf_counter()
    models = demo_models(out, config, console, study)
    trained = time.perf_counter()
    _print_accuracies(console, models, config, torch.get_num_threads(), study)

    campaigns = {}
    for c in demo_campaigns(quick):
        folders = []
        for name, m in models.items():
            plan = make_plan(m["dir"], site="activations", layers=c.layers, n=c.n, clamp=c.clamp,
                             format="fp32", fault="bitflip", seed=0)
            folder = out / "campaigns" / c.name / name
            run_campaign(plan, folder, show_progress=True, device=device,
                         label=f"{c.name}: {name}", log_inputs=False)
            folders.append(folder)
        campaigns[c.name] = folders
        results = [load_results(f) for f in folders]
        _verdicts(console, f"{c.name}: fp32 bit flips in activations, clamp {c.clamp}",
                  brief_lines(results[0], vs=results[1:]))
    hardened = _run_hardening(out, quick, models, campaigns, console, device)
    injected = time.perf_counter()

    # One report per campaign: a report compares models under a single plan.
    reports = {c.name: write_report(campaigns[c.name], out / report_name(c.name),
                                    names=list(models))
               for c in demo_campaigns(quick)}
    for h in demo_hardening(quick):
        folders = hardened[h.name]
        reports[h.name] = write_report(list(folders.values()), out / report_name(h.name),
                                       names=list(folders))
    console.rule("reports: every table, plot and interval", style="dim")
    for name, path in reports.items():
        console.print(f"{name:<22} {path}", highlight=False, overflow="fold")
    console.print(
        f"training {trained - started:.0f} s, campaigns {injected - trained:.0f} s, "
        f"total {time.perf_counter() - started:.0f} s", highlight=False
    )
    return {"models": models, "campaigns": campaigns, "report": reports["last-layer"],
            "reports": reports}


def _verdicts(console: Console, title: str, lines: list[str]) -> None:
    """A campaign's verdicts, one line each, under its title (wrapped at the log's width)."""
    console.rule(title, style="dim")
    for line in lines:
        for part in textwrap.wrap(line, LOG_WIDTH, subsequent_indent="  ",
                                  break_on_hyphens=False):
            console.print(part, highlight=False, markup=False)


def _run_hardening(out: Path, quick: bool, models: dict, campaigns: dict,
                   console: Console, device: str = "cpu") -> dict:
    """Run every hardening comparison; returns {comparison: {label: results folder}} with
    each model's unprotected campaign first."""
    from flipsafe.campaign.runner import make_plan, run_campaign
    from flipsafe.report import load_results
    from flipsafe.report.tables import brief_lines

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
                run_campaign(plan, folder, show_progress=True, device=device,
                             label=f"{h.name}: {label}", log_inputs=False)
                folders[label] = folder
        results = [load_results(f) for f in folders.values()]
        _verdicts(console, f"{h.name}: {h.site} of layers {h.layers!r}",
                  brief_lines(results[0], vs=results[1:]))
        done[h.name] = folders
    return done


def report_name(campaign: str) -> str:
    """The demo's report file for a campaign: report.html for the last layer, as before."""
    return "report.html" if campaign == "last-layer" else f"report-{campaign}.html"


def _print_accuracies(console: Console, models: dict, config: TrainConfig, threads: int,
                      study: DemoStudy) -> None:
    console.print(f"{study.dataset}, {study.arch}, {config.epochs} epochs, seed {config.seed}, "
                  f"{threads} CPU threads", highlight=False)
    table = Table()
    table.add_column("model")
    table.add_column("head")
    table.add_column("test accuracy", justify="right")
    for name, r in models.items():
        table.add_row(name, r["head"], f"{100 * r['accuracy']:.2f}%")
    console.print(table)
