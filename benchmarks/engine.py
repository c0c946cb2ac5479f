"""Benchmark the injection engine against PyTorchFI and clean inference, on a CIFAR-style
ResNet-18 and on Hugging Face transformers classifiers (ViT, ResNet)."""

# Random weights, the same fault lists for both tools, timed in the same run (interleaved
# rounds). Prints a table and, as its last line, one JSON object. PyTorchFI is a
# benchmark-only dependency (pip install pytorchfi==0.6.0) of the built-in section;
# the real-model section (--sections real) needs only transformers.
#
#     python benchmarks/engine.py [--device cpu] [--threads 2] [--quick] [--sections real]
#                                 [--models vit,resnet]

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time

import torch
from torch import nn

from flipsafe import models
from flipsafe.campaign.plan import CampaignPlan
from flipsafe.faults import FaultSet
from flipsafe.inject import Engine
from flipsafe.metrics.outcomes import GoldenOutcomes, compute_outcomes


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def pfi_layers(model):
    """Conv2d/Linear leaves in PyTorchFI's traversal order (children, depth first)."""
    names = []

    def walk(mod, prefix):
        for name, child in mod.named_children():
            full = f"{prefix}{name}"
            if not list(child.children()):
                if isinstance(child, (nn.Conv2d, nn.Linear)):
                    names.append(full)
            else:
                walk(child, full + ".")
    walk(model, "")
    return names


def neuron_coords(faults: FaultSet, shapes, order):
    layer, c, h, w = [], [], [], []
    for name, idx in zip(faults.layer_names, faults.index.tolist()):
        shape = shapes[name]
        coords = []
        for size in reversed(shape):
            coords.append(idx % size)
            idx //= size
        coords = coords[::-1] + [None] * (3 - len(shape))
        layer.append(order.index(name))
        c.append(coords[0])
        h.append(coords[1])
        w.append(coords[2])
    return layer, c, h, w


def run_pytorchfi_neurons(pfi, model, faults, shapes, order, images, labels, batch, ranges,
                          device):
    """random_neuron_single_bit_inj_batched with our locations: one fault per image."""
    from pytorchfi.neuron_error_models import random_neuron_single_bit_inj_batched  # noqa: F401

    with torch.no_grad():
        gold_logits = model(images)
        gold = GoldenOutcomes.of(gold_logits, labels)
        layer, c, h, w = neuron_coords(faults, shapes, order)
        img = faults.image
        sdc = 0
        for s in range(0, len(faults), batch):
            e = min(len(faults), s + batch)
            pfi.set_conv_max(ranges)
            # What random_neuron_single_bit_inj_batched declares, at our locations.
            corrupt = pfi.declare_neuron_fi(
                batch=list(range(e - s)), layer_num=layer[s:e], dim1=c[s:e], dim2=h[s:e],
                dim3=w[s:e], function=pfi.single_bit_flip_signed_across_batch)
            logits = corrupt(images[img[s:e]])
            out = compute_outcomes(gold.select(img[s:e]), logits, labels[img[s:e]])
            sdc += int(out.sdc.sum())
        return sdc


def run_pytorchfi_weights(pfi, model, faults, engine, images, labels, per_fault, device):
    """declare_weight_fi per fault (a model copy with the faulty weight), on the same images."""
    with torch.no_grad():
        gold = GoldenOutcomes.of(model(images), labels)
        order = pfi_layers(model)
        sdc = 0
        for s in range(0, len(faults), per_fault):
            name = faults.layers[int(faults.layer[s])]
            idx = int(faults.index[s])
            weight = engine.leaves[name].weight
            coords = list(torch.unravel_index(torch.tensor(idx), weight.shape))
            coords = [int(v) for v in coords] + [None] * (4 - weight.dim())
            codes = engine.params[(name, "weight")]
            _, new = codes.corrupt(faults.index[s:s + 1], False, faults.mask[s:s + 1],
                                     faults.op[s:s + 1], faults.value[s:s + 1])
            corrupt = pfi.declare_weight_fi(layer_num=[order.index(name)], k=[coords[0]],
                                            dim1=[coords[1]], dim2=[coords[2]],
                                            dim3=[coords[3]], value=[float(new[0, 0])])
            logits = corrupt(images)
            sdc += int(compute_outcomes(gold, logits, labels).sdc.sum())
        return sdc


class Logits(nn.Module):
    """A Hugging Face classifier as users wrap it: forward(x) returns the logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


def hf_models():
    """Real-world models flipsafe did not build (random init, nothing downloaded):
    [(key, description, model, image side)]."""
    import transformers as hf

    vit = hf.ViTConfig(image_size=32, patch_size=4, hidden_size=192, num_hidden_layers=6,
                       num_attention_heads=3, intermediate_size=768, num_labels=10)
    resnet = hf.ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512],
                             depths=[2, 2, 2, 2], layer_type="basic", num_labels=10)
    return [("hf_vit", "HF ViT 32px patch 4 hidden 192 x6",
             Logits(hf.ViTForImageClassification(vit)).eval(), 32),
            ("hf_resnet", "HF ResNet-18-sized 64px",
             Logits(hf.ResNetForImageClassification(resnet)).eval(), 64)]


def bench_real_models(args, device, gen, meter, clean_pair_for, rows, result):
    """Every model of hf_models(), measured beside its clean inference in the same rounds."""
    result["hook_fallback_vs_clean"], result["cold_vs_warm"] = {}, {}
    for key, what, model, side in hf_models():
        if args.models and key.removeprefix("hf_") not in args.models.split(","):
            continue
        bench_real_model(args, device, gen, meter, clean_pair_for, rows, result, key, what,
                         model.to(device), side)


def bench_real_model(args, device, gen, meter, clean_pair_for, rows, result, key, what, model,
                     side):
    """Activations and weights fp32: the graph executor (suffix runs), the forced hook
    fallback, and a fresh engine's first part (cold: capture, golden run and faults, as a
    campaign's first part) against the same part again (warm)."""
    images = torch.randn(args.images, 3, side, side, generator=gen).to(device)
    labels = torch.randint(10, (args.images,), generator=gen).to(device)
    clean_pair = clean_pair_for(model, images, f"clean {key}")
    n = args.hf_faults
    per_round = -(-n // args.rounds)
    made = {}

    def sorted_sample(eng, m, seed):
        f = eng.sample(m, "activations", "Conv2d|Linear", "bitflip",
                       images=torch.arange(m) % args.images,
                       generator=torch.Generator().manual_seed(seed))
        # Sorted by layer and cut into parts, as a campaign's fault list is.
        return f.select(torch.argsort(f.layer, stable=True))

    def fresh():
        eng = Engine(model, "fp32", device=device, chunk=args.batch, input_shape=(3, side, side))
        made["part"], made["engine"] = sorted_sample(eng, args.part, args.seed + 1), eng
        return eng.run(made["part"], images, labels)

    # Cold and warm in adjacent pairs (load on the machine varies): a fresh engine (capture,
    # golden runs) and a campaign's first part, then the same part again on that engine.
    cold_vs_warm = []
    for _ in range(args.cold_rounds):
        clean_pair(f"clean {key} cold")
        cold_s = timed(fresh, device)[1]
        warm_s = timed(lambda: made["engine"].run(made["part"], images, labels), device)[1]
        clean_pair(f"clean {key} cold")
        meter.log.setdefault(f"{key} cold", []).append((args.part, cold_s))
        meter.log.setdefault(f"{key} warm", []).append((args.part, warm_s))
        cold_vs_warm.append(warm_s / cold_s)
    made["faults"] = sorted_sample(made["engine"], n, args.seed)
    first_cold, cold_vs_warm = cold_vs_warm[0], statistics.median(cold_vs_warm)
    engine, act = made["engine"], made["faults"]
    if not engine.suffix:
        print(f"note: {key} runs on hooks: {engine.trace_error}")
    hooks = Engine(model, "fp32", device=device, chunk=args.batch, suffix=False)
    layers = set(act.layers)
    golden = meter(f"{key} act", 0, lambda: engine.golden(images, labels, layers=layers))
    g_hooks = meter(f"{key} hooks", 0, lambda: hooks.golden(images, labels, layers=layers))
    for r in range(args.rounds):
        part = act.select(slice(r * per_round, (r + 1) * per_round))
        clean_pair(f"clean {key} act")
        meter(f"{key} act", len(part), lambda p=part: engine.run(p, images, labels, golden))
        meter(f"{key} hooks", len(part), lambda p=part: hooks.run(p, images, labels, g_hooks))
        clean_pair(f"clean {key} act")
    vs = meter.ratio(f"{key} act", f"clean {key} act")
    hook_vs = meter.ratio(f"{key} hooks", f"clean {key} act")
    result[f"{key}_activations_vs_clean"] = vs
    result["hook_fallback_vs_clean"][key] = hook_vs
    result["cold_vs_warm"][f"{key}_activations"] = cold_vs_warm
    cold_vs = meter.ratio(f"{key} cold", f"clean {key} cold")
    result.setdefault("cold_vs_clean", {})[key] = cold_vs
    rows.append((f"clean {what}", "images/s", meter.rate(f"clean {key} act"), ""))
    rows.append((f"flipsafe activations fp32, {what}", "faults/s", meter.rate(f"{key} act"),
                 f"{vs:.2f}x clean ({'graph' if engine.suffix else 'hooks'})"))
    rows.append(("  forced hooks (suffix=False)", "faults/s", meter.rate(f"{key} hooks"),
                 f"{hook_vs:.2f}x clean"))
    rows.append((f"  fresh engine + first part of {args.part} (cold)", "faults/s",
                 meter.rate(f"{key} cold"),
                 (f"{cold_vs:.2f}x clean; {cold_vs_warm:.2f}x warm "
                  f"({meter.rate(f'{key} warm'):,.1f}/s; the process's first engine "
                  f"{first_cold:.2f}x)")))

    # Weights: each fault on the same images (up to 32), layers uniform (the sampling of a
    # per-layer estimate; weights uniform would favour the last, cheap layers).
    per = min(32, images.shape[0])
    w_imgs, w_lbls = images[:per], labels[:per]
    n_w = args.hf_weight_faults
    base = engine.sample(n_w, "weights", "Conv2d|Linear", "bitflip",
                         images=torch.zeros(n_w, dtype=torch.long), generator=gen, by="layer")
    wf = base.select(torch.arange(n_w).repeat_interleave(per)).with_image(
        torch.arange(per).repeat(n_w))
    clean_w = clean_pair_for(model, w_imgs, f"clean {key} w (all)")
    g_w = meter(f"{key} w", 0, lambda: engine.golden(w_imgs, w_lbls, layers=set(wf.layers)))
    per_r = -(-n_w // args.rounds) * per
    for r in range(args.rounds):
        part = wf.select(slice(r * per_r, (r + 1) * per_r))
        if not len(part):
            continue
        clean_w(f"clean {key} w")
        meter(f"{key} w", len(part), lambda p=part: engine.run(p, w_imgs, w_lbls, g_w))
        clean_w(f"clean {key} w")
    w_vs = meter.ratio(f"{key} w", f"clean {key} w")
    result[f"{key}_weights_vs_clean"] = w_vs
    rows.append((f"flipsafe weights fp32 (layers uniform), {what}", "pairs/s",
                 meter.rate(f"{key} w"),
                 f"{w_vs:.2f}x clean (PyTorchFI not measured on HF models)"))


class Meter:
    """Work and seconds per label and round. Other processes may load the machine in
    bursts, so a ratio is the median over rounds of ratios of adjacent measurements."""

    def __init__(self, device):
        self.device, self.log = device, {}

    def __call__(self, label, work, fn):
        out, secs = timed(fn, self.device)
        self.log.setdefault(label, []).append((work, secs))
        return out

    def rate(self, label):
        log = self.log[label]
        return sum(w for w, _ in log) / sum(s for _, s in log)

    def round_rates(self, label):
        """Per-round rates, one-off work (work 0, e.g. the golden run) spread evenly."""
        rounds = [(w, s) for w, s in self.log[label] if w]
        extra = sum(s for w, s in self.log[label] if not w) / len(rounds)
        return [w / (s + extra) for w, s in rounds]

    def ratio(self, a, b):
        pairs = [x / y for x, y in zip(self.round_rates(a), self.round_rates(b))]
        return statistics.median(pairs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=64, help="distinct images")
    ap.add_argument("--activation-faults", type=int, default=2048)
    ap.add_argument("--weight-faults", type=int, default=96, help="faults, each on 32 images")
    ap.add_argument("--batch", type=int, default=32, help="PyTorchFI batch size")
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds per comparison")
    ap.add_argument("--formats", default="bf16,fp16,int8,mxfp8_e4m3")
    ap.add_argument("--hf-faults", type=int, default=2048,
                    help="activation faults per Hugging Face model")
    ap.add_argument("--part", type=int, default=CampaignPlan.part_size,
                    help="faults in the cold run: a campaign's first part (its default size)")
    ap.add_argument("--cold-rounds", type=int, default=2, help="fresh engines per HF model")
    ap.add_argument("--hf-weight-faults", type=int, default=48,
                    help="weight faults per Hugging Face model, each on 32 images")
    ap.add_argument("--sections", default="builtin,real",
                    help="builtin (CIFAR ResNet-18 vs PyTorchFI), real (HF transformers models)")
    ap.add_argument("--models", default="",
                    help="real-model section: only these, comma-separated (vit, resnet)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a few faults, for a smoke test")
    args = ap.parse_args(argv)
    if args.quick:
        args.activation_faults, args.weight_faults, args.images, args.rounds = 256, 4, 32, 2
        args.hf_faults, args.hf_weight_faults, args.part, args.cold_rounds = 128, 4, 256, 1
    sections = set(args.sections.split(","))
    torch.set_num_threads(args.threads)
    logging.disable(logging.CRITICAL)  # PyTorchFI logs every injection
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    model = models.build("resnet18", 10).eval().to(device)
    images = torch.randn(args.images, 3, 32, 32, generator=gen).to(device)
    labels = torch.randint(10, (args.images,), generator=gen).to(device)
    meter = Meter(device)
    rounds = args.rounds
    rows, result = [], {}

    pending = {}

    def clean_pair_for(net, x, overall):
        def run():
            with torch.no_grad():
                for s in range(0, x.shape[0], args.batch):
                    net(x[s:s + args.batch])
        run()  # warm-up

        def clean_pair(label):
            """Clean inference right before and right after a measured round: one round."""
            w, secs = x.shape[0], timed(run, device)[1]
            meter.log.setdefault(overall, []).append((w, secs))
            if label in pending:
                w0, s0 = pending.pop(label)
                meter.log.setdefault(label, []).append((w0 + w, s0 + secs))
            else:
                pending[label] = (w, secs)
        return clean_pair

    if "real" in sections:
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("note: transformers is not installed; no real-model rows")
        else:
            bench_real_models(args, device, gen, meter, clean_pair_for, rows, result)
    if "builtin" not in sections:
        return report(rows, result)
    clean_pair = clean_pair_for(model, images, "clean")

    # -- activations, fp32: one fault per image, layers uniform over Conv2d/Linear --------
    engine = Engine(model, "fp32", device=device, chunk=args.batch)
    ranges = engine.profile(images)  # PyTorchFI's int8 flip needs per-layer ranges too
    n_act = args.activation_faults
    act = engine.sample(n_act, "activations", "Conv2d|Linear", "bitflip",
                        images=torch.arange(n_act) % args.images, generator=gen)
    # Rounds interleave the tools in time; sorting by layer first keeps each engine call
    # the size a campaign part would be (both tools get the very same slices).
    act = act.select(torch.argsort(act.layer, stable=True))
    from pytorchfi.neuron_error_models import single_bit_flip_func
    pfi = single_bit_flip_func(model, args.batch, input_shape=[3, 32, 32],
                               layer_types=[nn.Conv2d, nn.Linear], bits=8,
                               use_cuda=device.type == "cuda")
    order = pfi_layers(model)
    shapes = {i.name: i.output_shape for i in engine.layers("activations", "Conv2d|Linear")}
    pfi_ranges = [ranges[n] for n in order]
    golden = meter("act ours", 0, lambda: engine.golden(images, labels, layers=set(act.layers)))
    meter("act pfi", 0, lambda: GoldenOutcomes.of(model(images), labels))
    per_round = -(-n_act // rounds)
    sdc = {"ours": 0, "pfi": 0, "due": 0}
    for r in range(rounds):
        part = act.select(slice(r * per_round, (r + 1) * per_round))
        clean_pair("clean act")
        out = meter("act ours", len(part),
                    lambda part=part: engine.run(part, images, labels, golden))
        sdc["ours"] += int(out.sdc.sum())
        sdc["due"] += int(out.due.sum())
        sdc["pfi"] += meter("act pfi", len(part), lambda part=part: run_pytorchfi_neurons(
            pfi, model, part, shapes, order, images, labels, args.batch, pfi_ranges, device))
        clean_pair("clean act")
    ours_rate, pfi_rate = meter.rate("act ours"), meter.rate("act pfi")
    result["activations_per_s"] = ours_rate
    result["activations_vs_pytorchfi"] = meter.ratio("act ours", "act pfi")
    result["activations_vs_clean"] = meter.ratio("act ours", "clean act")
    rows.append(("flipsafe activations fp32", "faults/s", ours_rate,
                 (f"{result['activations_vs_clean']:.2f}x clean; SDC {sdc['ours']}, "
                  f"DUE {sdc['due']}")))
    rows.append(("pytorchfi random_neuron_single_bit_inj_batched", "faults/s", pfi_rate,
                 f"SDC {sdc['pfi']} (its own int8 bit flips)"))

    # -- weights, fp32: each fault on the same 32 images ---------------------------------------
    per = min(32, images.shape[0])
    w_imgs, w_lbls = images[:per], labels[:per]
    for by in ("element", "layer"):
        base = engine.sample(args.weight_faults, "weights", "Conv2d|Linear", "bitflip",
                             images=torch.zeros(args.weight_faults, dtype=torch.long),
                             generator=gen, by=by)
        wf = base.select(torch.arange(len(base)).repeat_interleave(per)).with_image(
            torch.arange(per).repeat(len(base)))
        tag = "weights uniform" if by == "element" else "layers uniform"
        g_w = meter(f"w ours {by}", 0, lambda wf=wf: engine.golden(w_imgs, w_lbls,
                                                                   layers=set(wf.layers)))
        meter(f"w pfi {by}", 0, lambda: model(w_imgs))
        per_r = -(-len(base) // rounds) * per
        counts = {"ours": 0, "pfi": 0}
        for r in range(rounds):
            part = wf.select(slice(r * per_r, (r + 1) * per_r))
            if not len(part):
                continue
            out_w = meter(f"w ours {by}", len(part),
                          lambda part=part, g_w=g_w: engine.run(part, w_imgs, w_lbls, g_w))
            counts["ours"] += int(out_w.sdc.sum())
            counts["pfi"] += meter(f"w pfi {by}", len(part), lambda part=part: run_pytorchfi_weights(
                pfi, model, part, engine, w_imgs, w_lbls, per, device))
        ours_w, pfi_w = meter.rate(f"w ours {by}"), meter.rate(f"w pfi {by}")
        rows.append((f"flipsafe weights fp32 ({tag})", "pairs/s", ours_w,
                     (f"SDC {counts['ours']}; "
                      f"{meter.ratio(f'w ours {by}', f'w pfi {by}'):.2f}x PyTorchFI")))
        rows.append((f"pytorchfi declare_weight_fi ({tag})", "pairs/s", pfi_w,
                     f"SDC {counts['pfi']}"))
        key = "weights_vs_pytorchfi" if by == "element" else "weights_vs_pytorchfi_layers_uniform"
        result[key] = meter.ratio(f"w ours {by}", f"w pfi {by}")

    # -- last layer, exhaustive ----------------------------------------------------------------
    ex, secs = timed(lambda: engine.exhaustive_last_layer(images[:per], labels[:per]), device)
    meter.log["last"] = [(len(ex), secs)]
    result["last_layer_pairs_per_s"] = meter.rate("last")
    rows.append(("flipsafe last layer exhaustive fp32", "pairs/s", meter.rate("last"),
                 f"{len(ex)} pairs, SDC {float(ex.outcomes.sdc.float().mean()) * 100:.2f}%"))

    # -- activations in emulated formats, same recipe ----------------------------------------------
    result["formats_vs_clean"] = {}
    for name in [f for f in args.formats.split(",") if f]:
        eng = Engine(model, name, device=device, chunk=args.batch)
        eng.profile(images)  # once, as on the training split; not timed
        faults = eng.sample(n_act, "activations", "Conv2d|Linear", "bitflip",
                            images=torch.arange(n_act) % args.images, generator=gen)
        faults = faults.select(torch.argsort(faults.layer, stable=True))
        g_f = meter(name, 0, lambda eng=eng, faults=faults: eng.golden(
            images, labels, layers=set(faults.layers)))
        clean_label = f"clean {name}"
        n_sdc = 0
        for r in range(rounds):
            part = faults.select(slice(r * per_round, (r + 1) * per_round))
            clean_pair(clean_label)
            out_f = meter(name, len(part), lambda eng=eng, part=part, g_f=g_f: eng.run(
                part, images, labels, g_f))
            clean_pair(clean_label)
            n_sdc += int(out_f.sdc.sum())
        rate = meter.rate(name)
        result["formats_vs_clean"][name] = meter.ratio(name, clean_label)
        rows.append((f"flipsafe activations {name}", "faults/s", rate,
                     f"{result['formats_vs_clean'][name]:.2f}x clean; SDC {n_sdc}"))

    result["clean_images_per_s"] = meter.rate("clean")
    rows.insert(0, ("clean fp32 inference (all rounds)", "images/s", meter.rate("clean"), ""))
    report(rows, result)


def report(rows, result):
    width = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{width}}  {'unit':>9}  {'rate':>12}  notes")
    for what, unit, rate, note in rows:
        print(f"{what:<{width}}  {unit:>9}  {rate:12,.1f}  {note}")
    if "activations_vs_pytorchfi" in result:
        print(f"activations: {result['activations_vs_pytorchfi']:.2f}x PyTorchFI, "
              f"{result['activations_vs_clean']:.2f}x clean; weights: "
              f"{result['weights_vs_pytorchfi']:.2f}x PyTorchFI (weights uniform), "
              f"{result['weights_vs_pytorchfi_layers_uniform']:.2f}x (layers uniform)")
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else
                          {a: round(b, 3) for a, b in v.items()})
                      for k, v in result.items() if not (isinstance(v, float)
                                                         and math.isnan(v))}))


if __name__ == "__main__":
    main()
