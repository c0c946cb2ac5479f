"""The `flipsafe` command: argument parsing and friendly errors only."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from flipsafe.errors import ConfigError, EnvironmentFailure, FlipsafeError, is_disk_full


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help unless it has no meaningful default."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default == [] or default is argparse.SUPPRESS
                or "default" in text or not action.option_strings):
            return text
        return super()._get_help_string(action)


def _one_of(names) -> str:
    return ", ".join(str(n) for n in names)


def _add_train_recipe(p: argparse.ArgumentParser) -> None:
    from flipsafe.train import OPTIMIZERS, TrainConfig

    d = TrainConfig()
    p.add_argument("--epochs", type=int, default=d.epochs, help="training epochs")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for initialisation and data order")
    p.add_argument("--lr", type=float, default=d.lr,
                   help=f"peak learning rate of the {d.schedule} schedule")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="training images per step")
    p.add_argument("--optimizer", default=d.optimizer, help=f"one of {_one_of(OPTIMIZERS)}")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="L2 weight decay of the optimizer")
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing,
                   help="label smoothing of the cross-entropy loss, in [0, 1)")


def _recipe(args):
    from flipsafe.train import TrainConfig

    return TrainConfig(
        epochs=args.epochs, seed=args.seed, lr=args.lr, batch_size=args.batch_size,
        optimizer=args.optimizer, weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
    )


def cmd_describe(args) -> None:
    from flipsafe import textguided as tg

    if args.dataset:
        from flipsafe.workflow import dataset_family

        family = dataset_family(args.dataset)
        if args.source == "bundled":
            if not family:
                raise FlipsafeError(
                    f"no bundled descriptions for {args.dataset!r}; use --source template or llm"
                )
            descriptions = tg.bundled_descriptions(family)
            _save_descriptions(tg, descriptions, args.out)
            return
        from flipsafe.data import load

        classes = load(args.dataset).classes if not family else list(tg.bundled_descriptions(family))
    else:
        classes = _read_classes(args.classes)
    if args.source in ("template", "bundled"):
        descriptions = tg.template_descriptions(classes)
    elif args.source.startswith("file:"):
        descriptions = tg.load_descriptions(args.source[len("file:"):], classes=classes)
    elif args.source == "llm":
        descriptions = tg.llm_descriptions(
            classes, base_url=args.llm_base_url, model=args.llm_model, api_key=args.llm_key,
            cache=args.llm_cache,
        )
    else:
        raise FlipsafeError(
            f"unknown description source {args.source!r}; choose bundled, template, file:<path> or llm"
        )
    _save_descriptions(tg, descriptions, args.out)


def _save_descriptions(tg, descriptions, out) -> None:
    tg.save_descriptions(descriptions, out)
    n = sum(len(v) for v in descriptions.values())
    k = len(descriptions)
    print(f"wrote {n} description{'' if n == 1 else 's'} for {k} class{'' if k == 1 else 'es'} "
          f"to {out}")


def _read_classes(path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FlipsafeError(f"class list {path!r} not found; give a text file with one class per line")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise FlipsafeError(f"class list {path!r} is not UTF-8 text") from None
    if p.suffix == ".json":
        try:
            classes = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FlipsafeError(f"class list {path!r} is not valid JSON ({exc})") from None
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            held = ("a list with non-string items" if isinstance(classes, list) else
                    "a JSON object" if isinstance(classes, dict) else f"the value {classes!r}")
            raise FlipsafeError(
                f"class list {path!r} must be a JSON list of class names (strings), not {held}"
            )
        classes = [c.strip() for c in classes if c.strip()]
    else:
        classes = [line.strip() for line in text.splitlines() if line.strip()]
    if not classes:
        raise FlipsafeError(f"class list {path!r} is empty")
    return classes


def cmd_embed(args) -> None:
    from flipsafe import textguided as tg

    descriptions = tg.load_descriptions(args.descriptions)
    emb = tg.encode_classes(descriptions, tg.get_encoder(args.encoder))
    emb.provenance.setdefault("descriptions", str(args.descriptions))
    tg.save_embeddings(emb, args.out)
    print(f"wrote {emb.vectors.shape[0]} class embeddings of width {emb.vectors.shape[1]} to {args.out}")


def cmd_train(args) -> None:
    from flipsafe.workflow import train_classifier

    _, meta, result = train_classifier(
        dataset=args.dataset, arch=args.arch, head=args.head, out=args.out,
        config=_recipe(args), freeze_head=args.freeze_head, show_progress=not args.quiet,
        overwrite=args.force,
    )
    print(f"{args.arch} with {meta['head']} head: test accuracy {100 * result.accuracy:.2f}%  -> {args.out}")


def cmd_evaluate(args) -> None:
    from flipsafe.checkpoint import check_dataset, load_checkpoint
    from flipsafe.data import load
    from flipsafe.train import evaluate

    ckpt = load_checkpoint(args.model_dir)
    spec = args.dataset or ckpt.config.get("dataset", "digits")
    bundle = load(spec)
    check_dataset(ckpt.config, bundle)
    acc = evaluate(ckpt.model, bundle.test)
    print(f"{args.model_dir}: test accuracy on {spec} {100 * acc:.2f}% ({len(bundle.test)} images)")


def _plan_from_args(args):
    """The campaign plan the flags describe, and its model (resolved once: a python:
    callable is called once)."""
    from flipsafe.campaign.runner import make_plan
    from flipsafe.campaign.targets import resolve

    n = _count(args.n, "--n")
    # Flags left out are None and not passed on: the plan fills in its defaults (or the
    # protocol's), and refuses a flag given against --protocol.
    given = {
        "images": args.images, "site": args.site, "fault": args.fault, "layers": args.layers,
        "confidence": args.confidence, "clamp": args.clamp, "seed": args.seed,
        "allocation": args.allocation, "format": args.format, "dataset": args.dataset,
        "part_size": args.part_size, "protocol": args.protocol, "protect": args.protect,
    }
    fields = {name: value for name, value in given.items() if value is not None}
    fields["n"] = n
    if n is not None and args.margin is not None:
        raise ConfigError("--n and --margin are alternatives: --n sets the injections per layer, "
                          "--margin sizes them from --confidence; give one of them")
    if n is not None:
        fields["margin"] = None
    elif args.margin is not None:
        fields["margin"] = args.margin
    sampling = args.sampling
    if sampling is None:  # the margin decides the size: adaptive, unless fields are split by
        # hand or a protection replays the unprotected campaign's very faults (fixed lists)
        fixed = n is not None or args.allocation is not None or args.protect is not None
        sampling = "fixed" if fixed else "adaptive"
    fields["sampling"] = sampling  # the plan refuses adaptive with --n
    if args.budget is not None:
        fields["budget"] = args.budget
    if args.word_bits is not None:
        fields["word_bits"] = args.word_bits
    pe = [v for v in (args.dataflow, args.array, args.pe_unit) if v is not None]
    if pe:  # the plan checks they go with --site pe and completes the defaults
        fields["accelerator"] = ":".join(pe)
    preprocess = {"image_size": args.image_size, "mean": _numbers(args.mean, "--mean"),
                  "std": _numbers(args.std, "--std")}
    if any(v is not None for v in preprocess.values()):
        fields["preprocess"] = preprocess
    target = resolve(args.model_dir)
    return make_plan(target, **fields), target


def _numbers(text, flag, kind=float, what="numbers separated by commas (one per channel)"):
    """The comma- (or space-) separated numbers of a flag; None when it was left out."""
    if text is None:
        return None
    try:
        return [kind(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise FlipsafeError(f"{flag} takes {what}, got {text!r}") from None


def _print_strata(prep) -> None:
    from rich.console import Console
    from rich.table import Table

    pilot = " (the adaptive pilot)" if prep.plan.adaptive else ""
    table = Table(title=f"{prep.plan.site} faults, {prep.plan.format}, {prep.plan.fault}{pilot}")
    for col in ("layer", "field", "fault space", "injections"):
        table.add_column(col, justify="left" if col in ("layer", "field") else "right")
    for s in prep.strata:
        table.add_row(s.layer, s.field, f"{s.size:,}", f"{s.n:,}")
    table.add_row("total", "", f"{sum(s.size for s in prep.strata):,}", f"{prep.total:,}")
    Console().print(table)
    print(f"images: {prep.image_ids.numel()} of {len(prep.labels)} ({prep.plan.images}); "
          f"classifier layer ('last'): {prep.classifier}")
    if prep.inputs is not None:
        print(prep.inputs.describe())
        for warning in prep.inputs.warnings():
            print(f"flipsafe: warning: {warning}", file=sys.stderr)
    if prep.protector is not None:
        layers = "; ".join(f"{k} on {', '.join(v)}" for k, v in prep.protector.layers.items())
        print(f"protect: {prep.plan.protect} ({layers})")
        for note in prep.protector.notes:
            print(f"  {note}")


def _print_adaptive(prep) -> None:
    """Fixed and adaptive cost side by side: the pilot is known, stage 2 depends on the
    rates the pilot finds, so it is projected at a few SDC rates."""
    from rich.console import Console
    from rich.table import Table

    from flipsafe.campaign import adaptive
    from flipsafe.campaign.plan import n_from_plan

    plan = prep.plan
    fixed = dataclasses.replace(plan, sampling="fixed", budget=None)
    sizes, pilot = {}, {}
    for s in prep.strata:
        sizes[s.layer] = sizes.get(s.layer, 0) + s.size
        pilot[s.layer] = pilot.get(s.layer, 0) + s.n
    rates = adaptive.projection(prep.strata, plan.margin, plan.confidence)
    table = Table(title=f"fixed vs adaptive, +-{plan.margin:.2%} at {plan.confidence:.0%} per layer")
    for col in ("layer", "fixed", "adaptive pilot", *(f"+ stage 2, {r}" for r in rates)):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for layer, size in sizes.items():
        table.add_row(layer, f"{n_from_plan(fixed, size):,}", f"{pilot[layer]:,}",
                      *(f"{per[layer]:,}" for per in rates.values()))
    table.add_row("total", f"{sum(n_from_plan(fixed, n) for n in sizes.values()):,}",
                  f"{sum(pilot.values()):,}", *(f"{sum(per.values()):,}" for per in rates.values()))
    Console().print(table)
    print("adaptive: the table above is the pilot; stage 2 is sized from its rows, so it is "
          "projected here as if each layer's pilot saw the rate named (trained models: a few "
          "per cent, nearly all in exponent bits)" + (
              "" if plan.budget is None else f"; --budget caps all at {plan.budget:,}"))


def cmd_plan(args) -> None:
    from flipsafe.campaign.runner import estimate_seconds, prepare

    plan, target = _plan_from_args(args)
    prep = prepare(plan, target=target, device=args.device)
    _print_strata(prep)
    if plan.adaptive:
        _print_adaptive(prep)
    seconds = estimate_seconds(prep)
    bound = "under 1 s" if seconds < 1 else f"at most {seconds:,.0f} s"
    print(f"estimated run time: {bound} on this machine "
          "(clean-inference rate; suffix execution is usually faster)")


def cmd_campaign(args) -> None:
    from flipsafe.campaign.backends import get_backend
    from flipsafe.campaign.runner import run_campaign

    plan, target = _plan_from_args(args)
    backend = get_backend(args.backend)  # its workers rebuild the target from the plan
    run = run_campaign(plan, args.out, backend=args.backend, address=args.address,
                       show_progress=not args.quiet, workers=args.workers, device=args.device,
                       target=None if backend.rebuilds else target)
    rate = f", {run.injections_per_s:,.0f} injections/s" if run.ran_parts else ""
    print(f"{run.total:,} injections in {args.out} ({run.kept_parts} parts kept, "
          f"{run.ran_parts} run{rate})")
    cmd_summary(argparse.Namespace(results_dir=args.out, vs=[]))


def cmd_summary(args) -> None:
    from flipsafe.report import load_results, summary_table, with_unique_names

    faults = getattr(args, "faults", [])
    named = with_unique_names([load_results(d) for d in [args.results_dir, *args.vs, *faults]])
    base, others = named[0], named[1:1 + len(args.vs)]
    fault_runs = named[1 + len(args.vs):]
    top = getattr(args, "channels", None)
    if getattr(args, "json", False):
        from flipsafe.report import summary_json

        data = summary_json(base, vs=others)
        if top is not None:
            from flipsafe.report.channels import channel_rows

            data["channels"] = channel_rows(base, top)
        print(json.dumps(data, indent=2, allow_nan=False))
    else:
        print(summary_table(base, vs=others))
        if fault_runs:
            from flipsafe.report.faults import fault_models_tables

            for table in fault_models_tables(base, fault_runs):
                print(table.render_text())
        if top is not None:
            from flipsafe.report.channels import channel_text

            print()
            print(channel_text(base, top))


def cmd_report(args) -> None:
    from flipsafe.report import write_report

    path = write_report([args.results_dir, *args.vs], args.out, fmt=args.format,
                        attacks=args.attack, faults=args.faults)
    print(f"report written to {path}")


def cmd_fit(args) -> None:
    from flipsafe.report.safety import fit_json, fit_text
    from flipsafe.safety import FitAssumptions, estimate_fit

    assumptions = FitAssumptions(
        raw_fit_per_mbit=args.raw_fit_per_mbit,
        raw_fit_per_mbit_datapath=args.raw_fit_per_mbit_datapath, residency=args.residency,
        confidence=args.confidence, due_detected=not args.due_undetected,
        allow_mixed_formats=args.allow_mixed_formats)
    estimates = estimate_fit(args.results_dirs, assumptions)
    print(fit_json(estimates) if args.json else fit_text(estimates))


def _add_size_flags(p: argparse.ArgumentParser, d) -> None:
    """How many faults a campaign injects, and how it chooses them (d: the plan's defaults)."""
    from flipsafe.campaign.adaptive import PILOT_PER_LAYER
    from flipsafe.campaign.plan import ALLOCATIONS, SAMPLINGS

    p.add_argument("--n", default=None,
                   help="injections per layer, or 'all' for the whole fault space; replaces "
                        "--margin, which it refuses beside it (default: sized per layer from "
                        "--confidence and --margin)")
    p.add_argument("--confidence", type=float, default=None,
                   help="confidence level of the sample size, strictly between 0 and 1 "
                        f"(default: {d.confidence})")
    p.add_argument("--margin", type=float, default=None,
                   help="error margin of each layer's rate at --confidence, strictly between 0 "
                        f"and 1; not with --n (default: {d.margin})")
    p.add_argument("--sampling", default=None,
                   help=f"how --margin sizes the campaign: one of {_one_of(SAMPLINGS)}. adaptive: "
                        f"a pilot of {PILOT_PER_LAYER} faults per layer finds where the SDCs "
                        "and DUEs "
                        "are, then a second stage sized to reach --margin in every layer "
                        "(Neyman allocation over bit fields; intervals from the second stage "
                        "only, so they hold whatever the pilot saw); fixed: Leveugle's "
                        "worst-case size (p = 0.5) for every layer (default: adaptive when "
                        "--margin decides the size, fixed with --n, --allocation or "
                        "--protect, which replays the fixed list of the unprotected run)")
    p.add_argument("--budget", type=int, default=None,
                   help="most injections an adaptive campaign may spend, pilot included; a "
                        "stage 2 that would not fit shrinks and the summary names the layers "
                        "that missed --margin (default: no cap)")
    p.add_argument("--word-bits", type=int, default=None,
                   help="--site weight_words: bits of one memory word holding several weight "
                        "codes side by side, 16, 32 or 64 (default: 32)")
    p.add_argument("--array", default=None, metavar="RxC",
                   help="--site pe: the systolic array's rows x columns (default: 16x16)")
    p.add_argument("--dataflow", default=None,
                   help="--site pe: ws (weight-stationary), os (output-stationary), is "
                        "(input-stationary), or mma (a tensor core's m16n8 tile, 32 lanes) "
                        "(default: ws)")
    p.add_argument("--pe-unit", default=None,
                   help="--site pe: the PE unit stuck at a bit: product (multiplier output), "
                        "weight or input (operand registers), accumulator (os, mma) "
                        "(default: product)")
    p.add_argument("--allocation", default=None,
                   help="how a layer's injections split across bit fields: one of "
                        f"{_one_of(ALLOCATIONS)} (default: {d.allocation})")


def _add_plan_flags(p: argparse.ArgumentParser) -> None:
    from flipsafe.campaign.plan import CONVENTION_DEFAULTS, IMAGES, PROTOCOLS, CampaignPlan
    from flipsafe.data import KINDS
    from flipsafe.faults import CAMPAIGN_SITES as SITES
    from flipsafe.faults import FAULT_MODELS as FAULTS
    from flipsafe.formats import names as format_names
    from flipsafe.inject.emulate import CLAMPS
    from flipsafe.protect.registry import registered as protection_kinds

    # Defaults are None here and filled in by the plan, so a flag given against --protocol
    # can be told from one left out; the help shows the plan's defaults.
    d = argparse.Namespace(**{**{f.name: f.default for f in dataclasses.fields(CampaignPlan)},
                              **CONVENTION_DEFAULTS})
    p.add_argument("model_dir", metavar="MODEL",
                   help="checkpoint folder made by `flipsafe train`, hf:<folder>, "
                        "torchscript:<file.pt>, export:<file.pt2>, onnx:<file.onnx> or "
                        "python:<module>:<callable>")
    p.add_argument("--dataset", help=f"dataset spec: {_one_of(KINDS)} "
                                     "(default: a flipsafe checkpoint's own; required for other "
                                     "models)")
    p.add_argument("--image-size", type=int, default=None,
                   help="resize images to this size (models that do not say their own)")
    p.add_argument("--mean", default=None, help="per-channel normalisation mean, e.g. "
                   "0.485,0.456,0.406 (models that do not say; default: the dataset's)")
    p.add_argument("--std", default=None, help="per-channel normalisation std (as --mean)")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda or auto (cuda when available) (default: cpu)")
    p.add_argument("--protocol", default=None,
                   help=f"one of {_one_of(PROTOCOLS)}: an evaluation protocol's conventions in "
                        "one flag (goldeneye: site activations, images correct, clamp goldeneye, "
                        "fault bitflip; --layers stays free, default all); recorded in the "
                        "plan, and a flag that contradicts it is refused")
    p.add_argument("--site", default=None,
                   help=f"what faults corrupt: one of {_one_of(SITES)} (metadata, "
                        "weight_metadata: the shared scales of activations and weights; pe: a "
                        "processing element of --array; weight_words: memory words of stored "
                        f"weights, see --word-bits) (default: {d.site})")
    p.add_argument("--format", default=None,
                   help=f"number format the model runs in: one of {_one_of(format_names())} "
                        "(default: fp32; native for a quantized model: the int8 codes, scales "
                        "and activation codes it stores)")
    p.add_argument("--fault", default=None,
                   help=f"fault model: one of {_one_of(FAULTS)}, or bitflipK / burstK for K bits "
                        f"(K from 1 to 32) (default: {d.fault})")
    p.add_argument("--layers", default=None,
                   help="all (Conv and Linear), last, a layer name, a layer type or a regular "
                        f"expression on layer names (default: {d.layers})")
    p.add_argument("--images", default=None,
                   help=f"images faults land on: one of {_one_of(IMAGES)} (correct: the ones "
                        f"the model classifies right, the GoldenEye convention) (default: "
                        f"{d.images})")
    p.add_argument("--clamp", default=None,
                   help=f"activation range clamp: one of {_one_of(CLAMPS)} (profiled is "
                        f"sign-preserving) (default: {d.clamp})")
    p.add_argument("--protect", default=None,
                   help="protections replayed on the same faults as the unprotected "
                        "campaign, comma-separated, each with :key=value options (layers=SEL "
                        "as --layers, default all; per=layer|channel; budget=P%%:map=RESULTS "
                        "for dup/tmr channels from a vulnerability map), e.g. "
                        "ranger,abft:layers=last,dup; "
                        + "; ".join(f"{n} ({', '.join(k.sites)}): {k.does.replace('%', '%%')}"
                                    for n, k in protection_kinds().items())
                        + " (default: none)")
    _add_size_flags(p, d)
    p.add_argument("--seed", type=int, default=None, help=f"seed of the fault draw (default: {d.seed})")
    p.add_argument("--part-size", type=int, default=None,
                   help=f"rows per stored part, at least 1 (default: {d.part_size})")


def _census_text(result: dict) -> str:
    lines = [(f"catastrophic bits of {result['model']} ({result['format']}): weights whose one "
             f"flip lowers accuracy on {result['images']} test images by more than "
             f"{100 * result['drop']:.0f} points (clean {100 * result['clean_accuracy']:.2f}%)"),
             (f"{'layer':<24} {'bit':>3} {'weights':>9} {'catastrophic':>12} {'share':>7} "
             f"{'DUE':>6} {'worst acc':>9}")]
    for r in result["layers"]:
        lines.append(f"{r['layer']:<24} {r['bit']:>3} {r['weights']:>9,} {r['catastrophic']:>12,} "
                     f"{100 * r['share']:>6.1f}% {r['due']:>6,} {100 * r['worst_accuracy']:>8.1f}%")
    return "\n".join(lines)


def cmd_attack(args) -> None:
    from flipsafe.attack import ATTACK_FILE, CENSUS_FILE, AttackPlan, model_sha, run_attack

    if args.census:
        from flipsafe.attack import run_census

        bits = _numbers(args.bits, "--bits", int, "whole numbers separated by commas")
        result = run_census(args.model_dir, args.out, args.format, bits, args.drop,
                            args.census_images, show_progress=not args.quiet)
        print(_census_text(result))
        print(f"per layer and bit in {Path(args.out) / CENSUS_FILE}")
        return

    plan = AttackPlan(model_sha=model_sha(args.model_dir), format=args.format,
                      budget=args.budget, target_accuracy=args.target_accuracy, seed=args.seed,
                      attack_images=args.attack_images, protect=args.protect)
    r = run_attack(args.model_dir, args.out, plan, show_progress=not args.quiet)
    curve = ", ".join(f"{100 * a:.1f}%" for a in r["accuracy"][:12])
    more = ", ..." if len(r["accuracy"]) > 12 else ""
    print(f"{args.model_dir} with {plan.format} weights: clean accuracy "
          f"{100 * r['clean_accuracy']:.2f}%, after each flip: {curve}{more}")
    needed = (f"{r['flips_needed']} flip(s) reach the target {100 * r['target_accuracy']:.1f}%"
              if r["flips_needed"] else
              f"{len(r['flips'])} flip(s) did not reach the target "
              f"{100 * r['target_accuracy']:.1f}% (final {100 * r['final_accuracy']:.2f}%)")
    print(f"{needed}; {r['evaluations']:,} candidate evaluations, "
          f"{r['evaluations_per_s']:,.0f}/s; flips in {Path(args.out) / ATTACK_FILE}")
    for p in r.get("protections", []):
        n, naive, physical = p["flips"], p["naive"], sum(p["physical_flips"])
        seen = ("the memory flags the attack (DUE)" if naive["due"] else
                f"accuracy stays {100 * naive['accuracy']:.2f}%")
        print(f"with {p['protection']}: those {n} flips alone come back {naive['words_corrected']}"
              f" word(s) corrected, {naive['words_detected']} detected, "
              f"{naive['words_silent']} silent: {seen}; an attacker who also rewrites "
              f"the check bits needs {physical} flips ({physical / max(n, 1):.1f}x)")


def _attack_command(add) -> None:
    p = add("attack", help="the fewest weight bit flips that break a model (progressive bit "
                           "search)")
    p.add_argument("model_dir", metavar="MODEL", help="checkpoint folder made by `flipsafe train`")
    p.add_argument("--format", default="fp32",
                   help="number format the weights are stored in (any flipsafe format: fp32, "
                        "fp16, bf16, int8, ...); the attack flips bits of those codes "
                        "(default: fp32)")
    p.add_argument("--budget", type=int, default=20, help="most flips to make (default: 20)")
    p.add_argument("--target-accuracy", type=float, default=None,
                   help="stop once test accuracy is at most this fraction (default: random "
                        "guessing + 1 point, e.g. 0.11 for 10 classes)")
    p.add_argument("--attack-images", type=int, default=128,
                   help="training images the search ranks flips on (default: 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the attack batch (default: 0)")
    p.add_argument("--protect", default=None,
                   help="protections the attack meets, comma-separated: ranger or clip hold "
                        "every Conv/Linear output within its profiled range during the whole "
                        "search; ecc or parity (codes over stored weight words) then read the "
                        "flips found back: what a naive attacker's flips become, and the flips "
                        "one who rewrites the check bits needs")
    p.add_argument("--census", action="store_true",
                   help="instead of the search: for each layer, the share of weights whose "
                        "single flip of --bits lowers test accuracy by more than --drop (every "
                        "weight, in the engine's emulation of --format)")
    p.add_argument("--bits", default=None,
                   help="census bit positions, comma-separated (default: a float format's top "
                        "exponent bit, else the code's top bit)")
    p.add_argument("--drop", type=float, default=0.1,
                   help="census: accuracy drop that makes a flip catastrophic (default: 0.1)")
    p.add_argument("--census-images", type=int, default=64,
                   help="census: test images each flip is judged on (default: 64)")
    p.add_argument("--out", required=True,
                   help="folder for attack.json (rerun the same command to resume)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_attack)


def cmd_demo(args) -> None:
    from flipsafe.demo import DemoStudy, run_demo

    run_demo(out=args.out, quick=args.quick, threads=args.threads,
             study=DemoStudy(dataset=args.dataset, arch=args.arch, encoder=args.encoder,
                             device=args.device))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flipsafe",
        description="Text-guided classifiers and bit-exact fault-injection campaigns.",
        formatter_class=_HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, **kw):
        return sub.add_parser(name, formatter_class=_HelpFormatter, **kw)

    for command in COMMANDS:
        command(add)
    return parser


def _describe_command(add) -> None:
    from flipsafe.workflow import BUNDLED_DESCRIPTION_SETS

    p = add("describe", help="write class descriptions to a JSON file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help=f"{_one_of(BUNDLED_DESCRIPTION_SETS)} or a dataset spec "
                                       "whose class names to describe")
    src.add_argument("--classes", help="text file with one class name per line (or a .json "
                                       "file holding a JSON list of strings)")
    p.add_argument("--source", default="bundled",
                   help="bundled (hand-written, for "
                        f"{_one_of(BUNDLED_DESCRIPTION_SETS)}), template, file:<path> or llm")
    p.add_argument("--llm-base-url", help="OpenAI-compatible endpoint (default: FLIPSAFE_LLM_BASE_URL)")
    p.add_argument("--llm-model", help="chat model name (default: FLIPSAFE_LLM_MODEL)")
    p.add_argument("--llm-key", help="API key (default: OPENAI_API_KEY)")
    p.add_argument("--llm-cache", default="llm-cache.json", help="answers cache, reused offline")
    p.add_argument("--out", required=True, help="descriptions JSON file to write")
    p.set_defaults(func=cmd_describe)


def _embed_command(add) -> None:
    from flipsafe.textguided.encoders import ENCODER_SPECS

    p = add("embed", help="encode descriptions into normalised class embeddings")
    p.add_argument("--descriptions", required=True,
                   help="descriptions JSON file made by `flipsafe describe`")
    p.add_argument("--encoder", default="minilm", help=f"text encoder: {_one_of(ENCODER_SPECS)}")
    p.add_argument("--out", required=True, help="class embeddings file to write (.safetensors)")
    p.set_defaults(func=cmd_embed)


def _train_command(add) -> None:
    from flipsafe.data import KINDS as DATASET_KINDS
    from flipsafe.models import ARCHITECTURES
    from flipsafe.workflow import HEAD_SPECS

    p = add("train", help="train a baseline or text-guided classifier")
    p.add_argument("--dataset", default="digits", help=f"dataset spec: {_one_of(DATASET_KINDS)}")
    p.add_argument("--arch", default="resnet20",
                   help=f"backbone: one of {_one_of(ARCHITECTURES)}, or torchvision:<name> / "
                        "timm:<name> with the vision extra")
    p.add_argument("--head", default="linear", help=f"classifier head: {_one_of(HEAD_SPECS)}")
    p.add_argument("--freeze-head", action="store_true", help="keep the head's class vectors fixed")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--force", action="store_true",
                   help="replace a checkpoint already in --out (campaigns run on it no longer resume)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    _add_train_recipe(p)
    p.set_defaults(func=cmd_train)


def _evaluate_command(add) -> None:
    p = add("evaluate", help="print a checkpoint's test accuracy")
    p.add_argument("model_dir", help="checkpoint folder made by `flipsafe train`")
    p.add_argument("--dataset", help="dataset spec (default: the one it was trained on)")
    p.set_defaults(func=cmd_evaluate)


def _plan_command(add) -> None:
    p = add("plan", help="print a campaign's strata, injections and estimated time")
    _add_plan_flags(p)
    p.set_defaults(func=cmd_plan)


def _campaign_command(add) -> None:
    from flipsafe.campaign.backends import BACKENDS

    p = add("campaign", help="run (or resume) a fault-injection campaign")
    _add_plan_flags(p)
    p.add_argument("--backend", default="local",
                   help=f"where parts run: {' or '.join(BACKENDS)} (default: local)")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--workers", type=int, default=None, help="Ray workers (default: one per CPU)")
    p.add_argument("--out", required=True, help="results folder (re-run the same command to resume)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_campaign)


def _summary_command(add) -> None:
    p = add("summary", help="per-layer SDC/DUE rates with intervals")
    p.add_argument("results_dir", help="results folder made by `flipsafe campaign`")
    p.add_argument("--vs", nargs="+", action="extend", default=[],
                   help="results folders of other models run with the same plan")
    p.add_argument("--faults", nargs="+", action="extend", default=[], metavar="DIR",
                   help="results folders of the same model under other faults (element "
                        "against PE faults, say): their SDC rates per layer side by side")
    p.add_argument("--json", action="store_true",
                   help="print the same figures as one JSON object (null where undefined)")
    p.add_argument("--channels", type=int, nargs="?", const=5, default=None, metavar="K",
                   help="also show the K output channels of each layer ranked by the Wilson "
                        "lower bound of their SDC rate (then by rate), with intervals (an "
                        "activation campaign's vulnerability map; K defaults to 5; in --json: "
                        "a channels list)")
    p.set_defaults(func=cmd_summary)


def _report_command(add) -> None:
    from flipsafe.report.render import FORMATS as REPORT_FORMATS

    p = add("report", help="write an HTML (or Markdown) report")
    p.add_argument("results_dir", help="results folder made by `flipsafe campaign`")
    p.add_argument("--vs", nargs="+", action="extend", default=[],
                   help="results folders of other models run with the same plan")
    p.add_argument("--faults", nargs="+", action="extend", default=[], metavar="DIR",
                   help="results folders of the same model under other faults (element "
                        "against PE faults, say): their SDC rates per layer side by side")
    p.add_argument("--out", default="report.html", help="report file to write")
    p.add_argument("--attack", nargs="+", action="extend", default=[], metavar="DIR",
                   help="`flipsafe attack --out` folders: adds a \"Worst case\" section "
                        "(flips to break, the accuracy curve, the census)")
    p.add_argument("--format", default="html", help=f"one of {_one_of(REPORT_FORMATS)}")
    p.set_defaults(func=cmd_report)


def cmd_verify(args) -> int:
    from flipsafe.deployed import verify

    n = _count(args.n, "--n")
    result = verify.run(args.results_dir, args.runtime, None if n == "all" else n, args.seed,
                        optimize=not args.no_optimizations)
    print(verify.text(result))
    return 0 if result.ok else 1


def _count(value, flag: str):
    """A count flag as given: None, 'all', or an int (whose range its user checks)."""
    if value is None or value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise FlipsafeError(f"{flag} must be a positive integer or 'all', got {value!r}") from None


def _verify_command(add) -> None:
    from flipsafe.deployed.verify import RUNTIMES

    p = add("verify", help="replay a campaign's faults in the deployed model's own runtime",
            description="Replay a seeded sample of a finished campaign's rows on the model "
                        "file itself - ONNX Runtime for onnx:<file>, the saved program's "
                        "graph in torch for a PT2E export:<file> - and print how many rows "
                        "agree in each outcome column. Exit 1 on any disagreement.")
    p.add_argument("results_dir", metavar="RESULTS", help="a campaign's --out folder")
    p.add_argument("--runtime", default="auto",
                   help=f"one of auto, {_one_of(RUNTIMES)} (auto: the model's own)")
    p.add_argument("--n", default="200", help="rows to replay, or 'all' (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample of rows")
    p.add_argument("--no-optimizations", action="store_true",
                   help="run ONNX Runtime without its graph optimizations (the QDQ graph as "
                        "written, no fused integer kernels); default: as a deployed session")
    p.set_defaults(func=cmd_verify)


def _fit_command(add) -> None:
    p = add("fit", help="failure rates in FIT and ISO 26262 verdicts from campaigns")
    p.add_argument("results_dirs", nargs="+", metavar="RESULTS",
                   help="campaign results folders; those of one model are summed")
    # Rates are parsed (with units) and checked by flipsafe.safety, so a bad one is one line.
    p.add_argument("--raw-fit-per-mbit", default=None, metavar="RATE",
                   help="raw fault rate of memory bits (weights, metadata), FIT per 10^6 bits; "
                        "required, no default (e.g. 20.49, or with a unit: 600/MB)")
    p.add_argument("--raw-fit-per-mbit-datapath", default=None, metavar="RATE",
                   help="raw fault rate of activation (datapath) bits (default: the memory rate)")
    p.add_argument("--residency", default="1", metavar="FRACTION",
                   help="fraction of the time activations are live, in (0, 1] (default 1)")
    p.add_argument("--confidence", type=float, default=None,
                   help="confidence of every interval (default: the campaign's)")
    p.add_argument("--due-undetected", action="store_true",
                   help="nothing checks outputs for NaN/Inf: count DUE as residual, not detected")
    p.add_argument("--allow-mixed-formats", action="store_true",
                   help="sum campaigns of one model run in different number formats")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.set_defaults(func=cmd_fit)


def _demo_command(add) -> None:
    from flipsafe.data import KINDS as DATASET_KINDS
    from flipsafe.models import ARCHITECTURES
    from flipsafe.textguided.encoders import ENCODER_SPECS

    p = add("demo", help="the paper's study end to end: offline on digits, or on your data",
            description="Train a baseline, a text-guided and a cosine-control classifier "
                        "with one recipe, run the same fault campaigns on each, replay them "
                        "under hardening and write the reports. Offline by default (digits, "
                        "resnet20, minilm).")
    p.add_argument("--quick", action="store_true", help="fewer epochs and injections")
    p.add_argument("--dataset", default="digits", help=f"dataset spec: {_one_of(DATASET_KINDS)}")
    p.add_argument("--arch", default="resnet20",
                   help=f"backbone: one of {_one_of(ARCHITECTURES)}, or torchvision:<name> / "
                        "timm:<name> with the vision extra")
    p.add_argument("--encoder", default="minilm",
                   help=f"text encoder of the text-guided head: {_one_of(ENCODER_SPECS)}")
    p.add_argument("--device", default="cpu",
                   help="where training and campaigns run: cpu, cuda or auto (cuda when "
                        "available) (default: cpu)")
    p.add_argument("--out", default="flipsafe-demo", help="folder for the demo's models, "
                                                          "campaigns and reports")
    p.add_argument("--threads", type=int, default=4,
                   help="CPU threads for torch (default 4); training results depend on it")
    p.set_defaults(func=cmd_demo)


# Each adds one subcommand's parser, in the order --help lists them.
COMMANDS = (_describe_command, _embed_command, _train_command, _evaluate_command, _plan_command, _campaign_command, _summary_command, _report_command, _fit_command, _verify_command, _attack_command,
            _demo_command)


# What each command's --out names: a folder (True) or a file (False); checked before
# any work, so a bad path fails in a second rather than after training.
OUT_IS_FOLDER = {"train": True, "campaign": True, "demo": True,
                 "describe": False, "embed": False, "report": False}


def _check_out(args) -> None:
    from flipsafe.atomic import check_output

    if args.command == "campaign":
        from flipsafe.campaign.store import PLAN_FILE, refuse_foreign_folder

        refuse_foreign_folder(args.out)  # before any work: the folder must be a campaign's
        if (Path(args.out) / PLAN_FILE).is_file():
            return  # a campaign to resume: a finished one needs no write (the runner checks)
    if args.command in OUT_IS_FOLDER:
        check_output(args.out, folder=OUT_IS_FOLDER[args.command], what="--out")


def main(argv=None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader of stdout (say `| head -3`) has gone: stop quietly, as a Unix tool
        # killed by SIGPIPE does (exit 128 + 13), and send Python's final flush nowhere.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141


# Flags whose values are names from a list the help prints in lower case: any case is taken.
CASELESS = ("protocol", "site", "images", "clamp", "allocation", "backend", "device",
            "dataflow", "pe_unit", "optimizer")
CASELESS_BY_COMMAND = {"report": ("format",)}


def _caseless(args) -> None:
    for name in CASELESS + CASELESS_BY_COMMAND.get(args.command, ()):
        value = getattr(args, name, None)
        if isinstance(value, str):
            setattr(args, name, value.lower())


def _main(argv) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _caseless(args)
    try:
        _check_out(args)
        code = args.func(args)
    except FlipsafeError as exc:
        print(f"flipsafe: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # user code (a python: model, say) may not end a command quietly
        spec = getattr(args, "model_dir", None)
        where = f" ({spec})" if spec else ""
        print(f"flipsafe: error: user code{where} called sys.exit({exc.code!r}) during "
              f"`flipsafe {args.command}`; results already written are kept", file=sys.stderr)
        return 2
    except EnvironmentFailure as exc:
        print(f"flipsafe: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        print(f"flipsafe: error: no space left on the disk{where} ({exc.strerror}); files "
              "finished before are kept: free some space and run the command again",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("flipsafe: interrupted; results already written are kept", file=sys.stderr)
        return 130
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
