"""The injector: outcomes of faults, each injected alone into one run of its image."""

from __future__ import annotations

import dataclasses
import math

import torch

from flipsafe.errors import ConfigError, InjectionError, unknown
from flipsafe.faults import PARAMS, FaultSet
from flipsafe.inject import emulate
from flipsafe.inject.emulated import EmulatedModel
from flipsafe.inject.executors import GOLDEN_BATCH, Executor, Golden
from flipsafe.inject.sites import bind_sites
from flipsafe.metrics.outcomes import FIELDS, Outcomes, compute_outcomes, unchanged_outcomes


@dataclasses.dataclass(frozen=True)
class SiteValues:
    """Faults `rows` (positions in the FaultSet) of one layer and site (`param`: 'output',
    'weight', ...): the layer's golden `inputs` on their images, its `golden` output in the
    format and its `faulty` output (both [len(rows), ...], before any guard)."""

    layer: str
    param: str
    rows: torch.Tensor
    inputs: tuple
    golden: torch.Tensor
    faulty: torch.Tensor


def _groups(faults: FaultSet) -> dict:
    """Row indices of the faults of each (layer name, param code), in first-seen order."""
    key = faults.layer * len(PARAMS) + faults.param
    return {(faults.layers[k // len(PARAMS)], k % len(PARAMS)):
            (key == k).nonzero().reshape(-1) for k in torch.unique(key).tolist()}


def _empty_outcomes(n: int, device) -> Outcomes:
    def make(f):
        if f.endswith("top1"):
            return torch.zeros(n, dtype=torch.int64, device=device)
        if f in ("sdc", "due", "nonfinite", "ran"):
            return torch.zeros(n, dtype=torch.bool, device=device)
        return torch.zeros(n, dtype=torch.float32, device=device)
    return Outcomes(**{f: make(f) for f in FIELDS})


def _put(out: Outcomes, rows: torch.Tensor, part: Outcomes):
    for f in FIELDS:
        getattr(out, f)[rows] = getattr(part, f)


class Injector:
    """Runs faults on an emulated model with an executor: `run` gives their outcomes.

    clamp: the clamp mode of faulty values; chunk: faulty images per forward pass;
    memory: bytes of cached activations `run` may hold when it makes its own golden runs;
    batch: images per slice of a golden forward.
    """

    def __init__(self, em: EmulatedModel, ex: Executor, clamp: str = "none", chunk: int = 64,
                 memory: int = 1 << 30, batch: int = GOLDEN_BATCH):
        self.em, self.ex = em, ex
        self.clamp, self.chunk, self.memory, self.batch = clamp, chunk, int(memory), batch
        self.sites = bind_sites(em, ex)

    def run(self, faults: FaultSet, images: torch.Tensor, labels: torch.Tensor,
            golden: Golden | None = None) -> Outcomes:
        """Outcomes of every fault in `faults`, in their order (see Engine.run); images
        and labels on the model's device."""
        self.validate(faults, images.shape[0])
        if golden is not None:
            if golden.images.shape != images.shape:
                raise ConfigError("golden was computed for a different batch of images")
            return self._run_groups(faults, golden)
        out = _empty_outcomes(len(faults), self.em.device)
        used = torch.unique(faults.image)
        block = self.image_block(faults)
        for start in range(0, used.numel(), block):
            ids = used[start:start + block]
            rows = torch.isin(faults.image, ids).nonzero().reshape(-1)
            part = faults.select(rows)
            local = dataclasses.replace(part, image=torch.searchsorted(ids, part.image))
            dev_ids = ids.to(self.em.device)
            g = self.ex.golden(images[dev_ids], labels[dev_ids], set(local.layer_names),
                               self.batch)
            _put(out, rows.to(self.em.device), self._run_groups(local, g))
        return out

    def image_block(self, faults: FaultSet) -> int:
        """Images per golden block: as many as the cached values of `faults`' layers allow."""
        per_image = 0
        for name in set(faults.layer_names):
            per_image += 3 * math.prod(self.em.shapes.get(name) or (1,))
        return int(min(512, max(8, self.memory // max(1, 4 * per_image))))

    def _run_groups(self, faults: FaultSet, golden: Golden) -> Outcomes:
        groups = _groups(faults)
        self.ex.cache(golden, {name for name, _ in groups}, self.batch)
        out = _empty_outcomes(len(faults), self.em.device)
        for (name, param), rows in groups.items():
            res = self._run_group(name, PARAMS[param], faults.select(rows), golden)
            _put(out, rows.to(self.em.device), res)
        return out

    def validate(self, faults: FaultSet, n_images: int):
        """Refuse faults outside the batch, at layers without their site, or out of range."""
        if not isinstance(faults, FaultSet):
            raise ConfigError(f"faults must be a FaultSet, got {type(faults).__name__}")
        if len(faults) and (int(faults.image.min()) < 0 or int(faults.image.max()) >= n_images):
            raise InjectionError(f"fault image positions must be in 0..{n_images - 1} (the "
                                 f"batch has {n_images} images)")
        for (layer, param), rows in _groups(faults).items():
            site = self.sites[PARAMS[param]]
            cands = site.candidates()
            if layer not in self.em.leaves:
                raise unknown("layer", layer, cands)
            if layer not in cands:
                have = [s.name for s in self.sites.values()
                        if s.available() and layer in s.candidates()]
                raise InjectionError(
                    f"layer {layer!r} ({type(self.em.leaves[layer]).__name__}) has no "
                    f"{site.name} site ({site.why_not(layer)}); its sites: "
                    f"{', '.join(have) or 'none'}")
            numel = site.select(layer, site.name)[0].numel
            idx = faults.index[rows]
            if int(idx.min()) < 0 or int(idx.max()) >= numel:
                raise InjectionError(
                    f"fault index {int(idx.max()) if int(idx.max()) >= numel else int(idx.min())}"
                    f" is out of range for the {site.name} of {layer!r}; choose 0..{numel - 1}")

    def _clamped(self, site, layer: str, new: torch.Tensor) -> torch.Tensor:
        """Faulty values after the clamp mode (unchanged with clamp='none')."""
        if self.clamp == "none":
            return new
        # Weight limits are emulated values already; profiled output ranges are rounded
        # into the layer's output format.
        fmt = self.em.coder(layer).fmt if site.on_output and self.em.holds(layer) else None
        return emulate.clamp(new, site.limit(layer, self.clamp), self.clamp, fmt)

    def _run_group(self, name: str, pname: str, f: FaultSet, g: Golden) -> Outcomes:
        site = self.sites[pname]
        img, pos, new, old = site.corrupt(name, f, g)
        golden = g.outcomes.select(img)
        with torch.no_grad():
            nonfinite = ~torch.isfinite(new).all(1)
            new = self._clamped(site, name, new)
            changed = ~emulate.same_bits(new, old).all(1)
            res = unchanged_outcomes(golden, nonfinite)
            live = changed.nonzero().reshape(-1)
            if site.on_output and live.numel():
                live = live[~self.ex.masked(name, g, img[live], pos[live], new[live],
                                            site.meta)]
            for start in range(0, live.numel(), self.chunk):
                rows = live[start:start + self.chunk]
                value = site.start_value(name, g, img[rows], pos[rows], new[rows], old[rows])
                logits = self.ex.logits_after(name, value, img[rows], g,
                                              pos[rows] if site.on_output else None)
                if logits is None:
                    continue
                part = compute_outcomes(golden.select(rows), logits, g.labels[img[rows]],
                                        nonfinite[rows])
                _put(res, rows, part)
        return res

    def site_values(self, faults: FaultSet, golden: Golden, chunk: int = 256):
        """For each group of at most `chunk` faults of one layer: SiteValues with the
        layer's golden inputs on their images, its golden output in the format and its
        output with the fault (both before any guard). What protections that check a
        layer's own computation (checksums, duplication) look at."""
        self.validate(faults, golden.images.shape[0])
        groups = _groups(faults)
        self.ex.cache(golden, {name for name, _ in groups}, self.batch)
        for (name, param), rows in groups.items():
            site = self.sites[PARAMS[param]]
            for start in range(0, rows.numel(), chunk):
                sel = rows[start:start + chunk]
                img, pos, new, old = site.corrupt(name, faults.select(sel), golden)
                new = self._clamped(site, name, new)
                with torch.no_grad():
                    faulty = site.faulty_output(name, golden, img, pos, new, old)
                    gold = self.em.quantize_output(name, golden.raw[name].index_select(0, img))
                inputs = tuple(a.index_select(0, img) if isinstance(a, torch.Tensor) else a
                               for a in golden.inputs[name])
                yield SiteValues(name, PARAMS[param], sel, inputs, gold, faulty)
