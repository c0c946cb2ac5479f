"""The worst case: a progressive bit search (Rakin et al., ICCV 2019) for the fewest bit
flips in stored weights that break a model.

The attacker flips bits of the weight codes as memory holds them: each Conv and Linear
weight tensor is encoded once in the chosen format (`flipsafe.formats`; per-tensor scales
stay those of the clean weights, as stored), and a flip XORs one bit of one code; the
model then computes with the decoded weights (activations in float32). Each step ranks
every (element, bit) of every layer by the first-order loss increase grad * (w' - w) on a
held-out attack batch from the training split (a flip already made is not made again),
evaluates the CANDIDATES best of each layer
exactly (one forward each), applies the one that misclassifies most attack images (ties:
the one that raises their loss most), and measures
accuracy on the test split. Flips whose decoded weight is not finite, or that make the
attack batch's scores non-finite, are skipped: they raise a detectable NaN/Inf (a DUE), not
a silent misclassification. The search stops when the
test accuracy reaches the target (default: random guessing + 1 point) or after `budget`
flips. Everything is seeded; the result file (ATTACK_FILE) is rewritten after every flip,
and a second run with the same settings resumes from the flips it holds.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flipsafe.errors import CampaignError, ConfigError
from flipsafe.formats import flip_bits

ATTACK_FILE = "attack.json"
CANDIDATES = 5
ATTACK_IMAGES = 128


@dataclass(frozen=True)
class AttackPlan:
    """What defines an attack's result: model hash, weight format, seed, flip budget,
    target accuracy (None: random guessing + 1 point) and the attack batch size."""

    model_sha: str
    format: str = "fp32"
    budget: int = 20
    target_accuracy: float | None = None
    seed: int = 0
    attack_images: int = ATTACK_IMAGES
    candidates: int = CANDIDATES
    # Protections the attack meets (comma-separated; see attack_kinds): bounds (ranger,
    # clip) guard every Conv/Linear output during the search, memory codes (ecc, parity)
    # then read the flips found back.
    protect: str | None = None

    def __post_init__(self):
        from flipsafe.formats import canonical

        object.__setattr__(self, "format", canonical(self.format))
        if self.protect is not None:
            memory, bounds = attack_kinds(self.protect)
            names = ",".join(k.name for k in (*memory, *bounds))
            object.__setattr__(self, "protect", names or None)
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1:
            raise ConfigError(f"--budget must be a whole number of flips of at least 1, "
                              f"got {self.budget!r}")
        t = self.target_accuracy
        if t is not None and not (isinstance(t, (int, float)) and 0.0 <= t <= 1.0):
            raise ConfigError(f"--target-accuracy must be a fraction between 0 and 1 (e.g. 0.11),"
                              f" got {t!r}")
        for name in ("attack_images", "candidates"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a whole number of at least 1, got {value!r}")


class StoredWeights:
    """The Conv/Linear weights of `model` as codes of `fmt`, encoded once; flips change
    codes, and the model's weights are set to the decoded codes."""

    def __init__(self, model: nn.Module, fmt):
        self.fmt = fmt
        self.layers = {name: mod for name, mod in model.named_modules()
                       if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear))}
        if not self.layers:
            raise ConfigError("the model has no Conv or Linear layer whose weights to attack")
        self.encoded = {name: fmt.encode(mod.weight.detach().float())
                        for name, mod in self.layers.items()}
        self.bits = sorted(b for positions in fmt.fields.values() for b in positions)
        for name in self.layers:
            self._write(name)

    def decoded(self, name: str, codes: torch.Tensor | None = None) -> torch.Tensor:
        enc = self.encoded[name]
        if codes is None:
            return self.fmt.decode(enc)
        return self.fmt.decode(type(enc)(codes, enc.meta))

    def set_codes(self, name: str, codes: torch.Tensor) -> None:
        """Store `codes` (flat, int32) as layer `name`'s codes and use them."""
        self.encoded[name].codes.reshape(-1).copy_(codes)
        self._write(name)

    def _write(self, name: str) -> None:
        w = self.layers[name].weight
        with torch.no_grad():
            w.copy_(self.decoded(name).reshape(w.shape).to(w.dtype))

    def flip(self, name: str, index: int, bit: int) -> None:
        """Flip `bit` of code `index` of `name` in place (its codes tensor stays the same)."""
        codes = self.encoded[name].codes
        codes.copy_(flip_bits(codes, torch.tensor([index]), 1 << bit))
        self._write(name)

    def flipped(self, name: str, bit: int) -> torch.Tensor:
        """Every element's decoded weight with `bit` flipped, flat (each decodes alone)."""
        return self.decoded(name, flip_bits(self.encoded[name].codes, None, 1 << bit)).reshape(-1)


def _score(model, x, y) -> tuple[int, float] | None:
    """(attack images misclassified, mean cross-entropy) of the attack batch; None when a
    score is not finite (a DUE, detectable)."""
    with torch.no_grad():
        logits = model(x)
    if not bool(torch.isfinite(logits).all()):
        return None
    return int((logits.argmax(1) != y).sum()), float(F.cross_entropy(logits, y))


def _accuracy(model, x, y, batch: int = 512) -> float:
    with torch.no_grad():
        hits = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
                   for i in range(0, len(y), batch))
    return hits / len(y)


def _candidates(model, weights: StoredWeights, x, y, per_layer: int) -> list[tuple]:
    """(layer, index, bit) flips to evaluate: of each layer, the `per_layer` that raise the
    attack loss most to first order, and the best of each bit position (an exponent's
    top bit often overflows the scores, a lower one does not), with finite weights."""
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    out = []
    for name, mod in weights.layers.items():
        grad = mod.weight.grad.detach().reshape(-1).float()
        w = mod.weight.detach().reshape(-1).float()
        scores = []
        for bit in weights.bits:
            new = weights.flipped(name, bit)
            gain = grad * (new - w)
            gain = torch.where(torch.isfinite(new) & torch.isfinite(gain), gain, -torch.inf)
            scores.append(gain)
        scores = torch.stack(scores)  # [bits, elements]
        top = torch.topk(scores.reshape(-1), min(per_layer, scores.numel()))
        picks = {(flat // w.numel(), flat % w.numel()) for value, flat in
                 zip(top.values.tolist(), top.indices.tolist()) if value > -float("inf")}
        best = scores.max(1)
        picks |= {(b, int(i)) for b, (v, i) in enumerate(zip(best.values.tolist(),
                                                             best.indices)) if v > 0}
        out += [(name, index, weights.bits[b]) for b, index in sorted(picks)]
    model.zero_grad(set_to_none=True)
    return out


def _scores_one_by_one(model, weights: StoredWeights, candidates, x, y) -> list:
    """_score of each candidate flip, made and undone in turn."""
    out = []
    for name, index, bit in candidates:
        weights.flip(name, index, bit)
        out.append(_score(model, x, y))
        weights.flip(name, index, bit)  # undo
    return out


def _scores_batched(model, weights: StoredWeights, candidates, x, y) -> list:
    """_score of each candidate flip, the candidates of one layer in one vmapped forward
    (torch.func: each gets its own copy of the layer's weight with its flip)."""
    from torch.func import functional_call, vmap

    scores: dict = {}
    by_layer: dict = {}
    for c in candidates:
        by_layer.setdefault(c[0], []).append(c)
    for name, group in by_layer.items():
        w = weights.layers[name].weight
        stack = w.detach().reshape(1, -1).repeat(len(group), 1)
        per_bit: dict = {}  # each bit's flipped weights, decoded once for the layer
        for row, (_, index, bit) in enumerate(group):
            if bit not in per_bit:
                per_bit[bit] = weights.flipped(name, bit)
            stack[row, index] = per_bit[bit][index]
        key = f"{name}.weight"

        def run(flat, shape=w.shape, key=key):
            return functional_call(model, {key: flat.reshape(shape)}, (x,))
        with torch.no_grad():
            logits = vmap(run)(stack)  # [candidates, images, classes]
        finite = torch.isfinite(logits).flatten(1).all(1)
        wrong = (logits.argmax(-1) != y).sum(1)
        loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(len(group)),
                               reduction="none").reshape(len(group), -1).mean(1)
        for c, ok, k, lo in zip(group, finite.tolist(), wrong.tolist(), loss.tolist()):
            scores[c] = (int(k), float(lo)) if ok else None
    return [scores[c] for c in candidates]


def _best(model, weights: StoredWeights, candidates, x, y) -> tuple[tuple, float, int]:
    """The candidate whose flip misclassifies most attack images (then: raises their loss
    most), evaluated exactly (batched per layer where torch.func can run the model, else
    one by one); its loss; and the evaluations made."""
    try:
        scores = _scores_batched(model, weights, candidates, x, y)
    except RuntimeError:  # a model vmap cannot run (data-dependent control flow, ...)
        scores = _scores_one_by_one(model, weights, candidates, x, y)
    best, best_score = None, None
    for c, score in zip(candidates, scores):
        if score is not None and (best_score is None or score > best_score):
            best, best_score = c, score
    return best, (best_score or (0, float("nan")))[1], len(candidates)


def _data(ckpt, plan: AttackPlan):
    from flipsafe.checkpoint import check_dataset
    from flipsafe.data import load

    bundle = load(ckpt.config.get("dataset", "digits"))
    check_dataset(ckpt.config, bundle)
    train_x, train_y = bundle.train.tensors()
    test_x, test_y = bundle.test.tensors()
    pick = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(plan.seed))
    pick = pick[:plan.attack_images]
    return (train_x[pick], train_y[pick]), (test_x, test_y), len(bundle.classes), train_x


def _read(out: Path, plan: AttackPlan) -> dict | None:
    path = out / ATTACK_FILE
    if not path.exists():
        return None
    try:
        held = json.loads(path.read_text(encoding="utf-8"))
        same = held["plan"] == asdict(plan)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CampaignError(f"{path} cannot be read ({exc}); choose another --out") from None
    if not same:
        diffs = ", ".join(f"{k} ({held['plan'].get(k)!r} there, {v!r} now)"
                          for k, v in asdict(plan).items() if held["plan"].get(k) != v)
        raise CampaignError(f"{out} holds another attack: {diffs}; choose another --out, or "
                            "rerun with the same settings to resume")
    return held


def model_sha(model_dir) -> str:
    from flipsafe.checkpoint import WEIGHTS, read_config

    return read_config(model_dir)["files"][WEIGHTS]


def run_attack(model_dir, out, plan: AttackPlan, show_progress: bool = True) -> dict:
    """Run (or resume) the attack of `plan` on the flipsafe checkpoint `model_dir`; the
    record (as ATTACK_FILE holds it) is returned. The plan's bounds protections guard the
    model throughout; its memory codes then read the flips found back (see against;
    record key "protections")."""
    from flipsafe import atomic
    from flipsafe.checkpoint import load_checkpoint
    from flipsafe.formats import get as get_format
    from flipsafe.progress import progress_bar

    kinds, bounds = attack_kinds(plan.protect)
    ckpt = load_checkpoint(model_dir)
    if model_sha(model_dir) != plan.model_sha:
        raise CampaignError(f"the checkpoint at {model_dir} is not the one this attack was "
                            "planned for (its weights hash differs)")
    model = ckpt.model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    weights = StoredWeights(model, get_format(plan.format))
    for mod in weights.layers.values():
        mod.weight.requires_grad_(True)
    (ax, ay), (tx, ty), classes, train_x = _data(ckpt, plan)
    guard_outputs(model, bounds, train_x)  # the search and every accuracy face them
    target = 1.0 / classes + 0.01 if plan.target_accuracy is None else plan.target_accuracy
    out = atomic.make_folder(out, "attack folder")
    record = _read(out, plan) or {
        "plan": asdict(plan), "model": str(model_dir), "classes": classes,
        "arch": ckpt.config.get("arch"), "head": ckpt.config.get("head", "linear"),
        "target_accuracy": target, "clean_accuracy": _accuracy(model, tx, ty),
        "flips": [], "accuracy": [], "attack_loss": [], "evaluations": 0, "seconds": 0.0}
    for f in record["flips"]:  # resume: the flips found so far, in their order
        weights.flip(f["layer"].removesuffix(".weight"), f["index"], f["bit"])
    acc = record["accuracy"][-1] if record["accuracy"] else record["clean_accuracy"]
    left = plan.budget - len(record["flips"])
    with progress_bar(f"attack {plan.format}", total=max(left, 0), unit="flip",
                      enabled=show_progress) as bar:
        while left > 0 and acc > target:
            started = time.perf_counter()
            x, y = ax, ay
            done = {(f["layer"].removesuffix(".weight"), f["index"], f["bit"])
                    for f in record["flips"]}
            cands = [c for c in _candidates(model, weights, x, y, plan.candidates)
                     if c not in done]
            best, loss, evaluations = _best(model, weights, cands, x, y)
            if best is None:
                break
            name, index, bit = best
            weights.flip(name, index, bit)
            acc = _accuracy(model, tx, ty)
            record["flips"].append({"layer": f"{name}.weight", "index": int(index),
                                    "bit": int(bit)})
            record["accuracy"].append(acc)
            record["attack_loss"].append(loss)
            record["evaluations"] += evaluations
            record["seconds"] += time.perf_counter() - started
            _finish(record, target)
            atomic.write_json(out / ATTACK_FILE, record)
            left -= 1
            bar.advance(1, info=f"accuracy {100 * acc:.1f}%")
    _finish(record, target)
    used = record["flips"][:record["flips_needed"] or len(record["flips"])]
    record["protections"] = []
    for kind in kinds:
        clean = load_checkpoint(model_dir).model.float().eval()
        guard_outputs(clean, bounds, train_x)
        record["protections"].append(against(clean, plan.format, used, kind, (tx, ty)))
    atomic.write_json(out / ATTACK_FILE, record)
    return record


def _finish(record: dict, target: float) -> None:
    accs = record["accuracy"]
    record["final_accuracy"] = accs[-1] if accs else record["clean_accuracy"]
    reached = [i for i, a in enumerate(accs) if a <= target]
    record["flips_needed"] = reached[0] + 1 if reached else None
    spent = max(record["seconds"], 1e-9)
    record["flips_per_s"] = len(accs) / spent
    record["evaluations_per_s"] = record["evaluations"] / spent


def apply_flips(model: nn.Module, fmt: str, flips: list[dict]) -> nn.Module:
    """`model` with its weights stored in `fmt` and `flips` applied (as ATTACK_FILE lists
    them): what anyone can do to check an attack's accuracy by hand."""
    from flipsafe.formats import get as get_format

    weights = StoredWeights(model, get_format(fmt))
    for f in flips:
        weights.flip(f["layer"].removesuffix(".weight"), f["index"], f["bit"])
    return model


def digest(record: dict) -> str:
    """A short hash of the flips found (to compare two runs at a glance)."""
    return hashlib.sha256(json.dumps(record["flips"]).encode()).hexdigest()[:12]


# -- the catastrophic-bit census ------------------------------------------------------

CENSUS_FILE = "census.json"
CENSUS_IMAGES = 64
CENSUS_DROP = 0.10


def default_census_bits(fmt) -> list[int]:
    """The bit a census checks by default: a float format's top exponent bit (the one a
    single flip multiplies a weight by about 2^(2^(e-1))), else the code's top bit."""
    exponent = fmt.fields.get("exponent")
    return [max(exponent)] if exponent else [fmt.bits - 1]


def flip_accuracies(engine, layer: str, numel: int, bit: int, images, labels, golden,
                    advance=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(accuracy on `images`, any non-finite score) after flipping `bit` of each of the
    `numel` weights of `layer` alone, every weight once, in engine runs of many faults."""
    from flipsafe.faults import FaultSet
    from flipsafe.faults.models import FLIP

    n_img = len(labels)
    hits = torch.zeros(numel, dtype=torch.int64)
    dues = torch.zeros(numel, dtype=torch.bool)
    step = max(1, 65536 // n_img)
    for lo in range(0, numel, step):
        idx = torch.arange(lo, min(numel, lo + step))
        faults = FaultSet([layer], layer=0, index=idx.repeat_interleave(n_img), mask=1 << bit,
                          op=FLIP, image=torch.arange(n_img).repeat(idx.numel()), param="weight")
        out = engine.run(faults, images, labels, golden)
        right = (out.faulty_top1 == labels[faults.image]) & ~out.due
        hits[idx] = right.reshape(-1, n_img).sum(1)
        dues[idx] = out.due.reshape(-1, n_img).any(1)
        if advance is not None:
            advance(idx.numel())
    return hits.double() / n_img, dues


def census(model: nn.Module, fmt: str, images: torch.Tensor, labels: torch.Tensor,
           bits=None, drop: float = CENSUS_DROP, show_progress: bool = True) -> dict:
    """For each Conv/Linear layer and bit: the share of its weights whose single flip of
    that bit lowers the accuracy on `images` by more than `drop`, every weight once
    (exhaustive), batched with the engine's weight path (inject.Engine in `fmt`: weights
    and activations as a campaign emulates them). Faults that make a score non-finite
    count as catastrophic too (and are counted apart as DUE)."""
    from flipsafe.inject import Engine
    from flipsafe.progress import progress_bar

    engine = Engine(model, fmt, input_shape=tuple(images.shape[1:]))
    if engine.fmt.needs_calibration:
        engine.profile(images)
    bits = default_census_bits(engine.fmt) if bits is None else [int(b) for b in bits]
    layers = engine.layers("weights", "all")
    golden = engine.golden(images, labels)
    clean = float((golden.outcomes.top1 == labels).double().mean())
    rows = []
    total = sum(info.numel for info in layers) * len(bits)
    with progress_bar(f"census {fmt}", total=total, unit="weight",
                      enabled=show_progress) as bar:
        for info in layers:
            for bit in bits:
                acc, dues = flip_accuracies(engine, info.name, info.numel, bit, images, labels,
                                            golden, bar.advance)
                bad = (clean - acc) > drop
                rows.append({"layer": info.name, "bit": bit, "weights": info.numel,
                             "catastrophic": int(bad.sum()), "share": float(bad.double().mean()),
                             "due": int(dues.sum()), "worst_accuracy": float(acc.min())})
    return {"format": engine.fmt.name, "bits": bits, "drop": drop, "images": len(labels),
            "clean_accuracy": clean, "layers": rows}


def run_census(model_dir, out, fmt: str = "fp32", bits=None, drop: float = CENSUS_DROP,
               images: int = CENSUS_IMAGES, show_progress: bool = True) -> dict:
    """census() of a flipsafe checkpoint on the first `images` test images, written to
    OUT/CENSUS_FILE."""
    from flipsafe import atomic
    from flipsafe.checkpoint import check_dataset, load_checkpoint
    from flipsafe.data import load

    if not (isinstance(drop, float) and 0.0 < drop < 1.0):
        raise ConfigError(f"--drop must be a fraction between 0 and 1 (e.g. 0.1), got {drop!r}")
    ckpt = load_checkpoint(model_dir)
    bundle = load(ckpt.config.get("dataset", "digits"))
    check_dataset(ckpt.config, bundle)
    x, y = bundle.test.tensors()
    result = census(ckpt.model.eval(), fmt, x[:images], y[:images], bits, drop, show_progress)
    result["model"] = str(model_dir)
    out = atomic.make_folder(out, "attack folder")
    atomic.write_json(out / CENSUS_FILE, result)
    return result


def read_folder(folder) -> dict:
    """{"attack": the record of ATTACK_FILE or None, "census": CENSUS_FILE's or None, "name":
    the folder's name} of an `flipsafe attack --out` folder; CampaignError when it holds
    neither file."""
    folder = Path(folder)
    found = {"name": folder.resolve().name}
    for key, name in (("attack", ATTACK_FILE), ("census", CENSUS_FILE)):
        path = folder / name
        try:
            found[key] = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
        except (OSError, ValueError) as exc:
            raise CampaignError(f"{path} cannot be read ({exc}); rerun the attack") from None
    if found["attack"] is None and found["census"] is None:
        raise CampaignError(f"{folder} holds no {ATTACK_FILE} or {CENSUS_FILE}; give the --out "
                            "folder of `flipsafe attack`")
    return found


# -- the attack against memory codes ------------------------------------------------------


def attack_kinds(names) -> tuple[list, list]:
    """(memory codes, output bounds) among the protections `names` (comma-separated or a
    list; protect.registry kinds that are in_memory, or need_bounds with a make_guard);
    ConfigError naming the ones an attack can meet otherwise."""
    from flipsafe.protect.registry import get, registered

    names = [n.strip().lower() for n in (names.split(",") if isinstance(names, str) else
                                         names or ()) if n.strip()]
    usable = [k for k in registered().values() if k.in_memory or k.needs_bounds]
    memory, bounds = [], []
    for name in names:
        try:
            kind = get(name)
        except ConfigError:
            kind = None
        if kind is None or kind not in usable:
            raise ConfigError(f"--protect {name}: an attack meets codes over stored weights "
                              f"and output bounds; choose from "
                              f"{', '.join(k.name for k in usable)}")
        (memory if kind.in_memory else bounds).append(kind)
    return memory, bounds


def guard_outputs(model: nn.Module, kinds, images: torch.Tensor) -> list:
    """Hold every Conv/Linear output of `model` within the range profiled on `images`
    (per layer), with each bounds kind's guard (ranger: clamp, clip: zero), as forward
    hooks; returns the hook handles."""
    layers = {name: mod for name, mod in model.named_modules()
              if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear))}
    seen: dict = {}

    def record(name):
        def hook(mod, inputs, out):
            lo, hi = out.detach().amin(), out.detach().amax()
            old = seen.get(name)
            seen[name] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
        return hook

    handles = [mod.register_forward_hook(record(name)) for name, mod in layers.items()]
    with torch.no_grad():
        for i in range(0, len(images), 512):
            model(images[i:i + 512])
    for h in handles:
        h.remove()
    handles = []
    for kind in kinds:
        for name, mod in layers.items():
            guard = kind.make_guard(*seen[name])
            handles.append(mod.register_forward_hook(lambda m, i, out, g=guard: g(out)))
    return handles


def against(model: nn.Module, fmt: str, flips: list[dict], kind, test) -> dict:
    """The search's `flips` met by memory code `kind` (protect.registry.Kind.memory):

    - a naive attacker flips only those data bits: the memory decodes every changed word
      with its stored check bits (corrected words read back clean, detected ones raise a
      DUE), and the model computes with what it reads: its test accuracy and how many
      words came back corrected, detected or silently changed;
    - an attacker who knows the code flips the check bits too, so every word reads back
      as written: the physical flips that takes, flip by flip and to the target."""
    from flipsafe.formats import get as get_format
    from flipsafe.protect.ecc import pack, per_word, unpack

    fm = get_format(fmt)
    weights = StoredWeights(model, fm)
    k = per_word(fm.bits)
    original = {name: enc.codes.reshape(-1).clone() for name, enc in weights.encoded.items()}
    physical = []
    for f in flips:  # knowing the code: each flip plus the check bits its word needs
        name = f["layer"].removesuffix(".weight")
        codes = weights.encoded[name].codes.reshape(-1)
        w = f["index"] // k
        before = pack(codes[w * k:(w + 1) * k], fm.bits)
        weights.flip(name, f["index"], f["bit"])
        after = pack(codes[w * k:(w + 1) * k], fm.bits)
        physical.append(1 + int(kind.memory(before, after)[0][0]))
    corrected = detected = silent = 0
    due = False
    for name, codes in original.items():  # naive: the data flips, decoded by the memory
        old, new = pack(codes, fm.bits), pack(weights.encoded[name].codes.reshape(-1), fm.bits)
        changed = np.flatnonzero(old != new)
        if not changed.size:
            continue
        _, decoded, flagged = kind.memory(old[changed], new[changed])
        detected += int(flagged.sum())
        corrected += int(((decoded == old[changed]) & ~flagged).sum())
        silent += int(((decoded != old[changed]) & ~flagged).sum())
        due |= bool(flagged.any())
        read = new.copy()
        read[changed] = decoded
        weights.set_codes(name, unpack(read, fm.bits, codes.numel()))
    x, y = test
    return {"protection": kind.name, "flips": len(flips), "physical_flips": physical,
            "naive": {"words_corrected": corrected, "words_detected": detected,
                      "words_silent": silent, "due": due,
                      "accuracy": None if due else _accuracy(model, x, y)}}
