"""Where a campaign's missing parts run: one class per backend, behind one protocol, in one
registry (`BACKENDS`). `run_campaign` looks its backend up once; adding a backend is one
class here."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from flipsafe.campaign.work import golden_cache, run_part
from flipsafe.errors import ConfigError
from flipsafe.progress import progress_bar


class Backend(Protocol):
    name: str
    # Workers rebuild the model and data from the plan (a model or data given in Python,
    # which the plan cannot name, does not run there).
    rebuilds: bool

    def run(self, prep, faults, store, todo: list[int], *, show_progress: bool,
            label: str | None, address: str | None, workers: int | None,
            device: str) -> None:
        """Inject parts `todo` of the prepared campaign and write each into `store`."""


class LocalBackend:
    """This process, part by part, with the campaign's golden runs shared by every part."""

    name, rebuilds = "local", False

    def run(self, prep, faults, store, todo, *, show_progress, label, address, workers,
            device):
        # Always the same decision (not one that depends on the parts left), so a resumed
        # or Ray run computes exactly the golden values a whole run does.
        golden = golden_cache(prep, faults) if todo else None
        total = sum(store.expected_rows(k) for k in todo)
        sdc = done = 0
        desc = label or prep.plan.progress_label
        with progress_bar(desc, total=total, unit="inj", enabled=show_progress) as bar:
            for k in todo:
                start, stop = store.part_bounds(k)
                # One engine call per part: the golden runs (of the whole campaign when
                # golden_cache allowed it, else of the part) are shared by every fault in
                # it (measured: twice the rate of 256-fault slices, each with its own).
                table = run_part(prep, faults, start, stop, golden)
                store.write_part(k, table)
                done += table.num_rows
                sdc += int(np.count_nonzero(table.column("sdc").to_numpy()))
                bar.advance(table.num_rows, info=f"SDC {100 * sdc / done:.2f}%")


class RayBackend:
    """Ray actors on a cluster (`address`) or a local Ray; see campaign.ray_backend."""

    name, rebuilds = "ray", True

    def run(self, prep, faults, store, todo, *, show_progress, label, address, workers,
            device):
        from flipsafe.campaign.ray_backend import run_parts_on_ray

        run_parts_on_ray(prep.plan, store, todo, address=address, workers=workers,
                         show_progress=show_progress, ranges=prep.ranges, device=device,
                         label=label, stages=prep.stages)


BACKENDS: dict[str, Backend] = {b.name: b for b in (LocalBackend(), RayBackend())}


def get_backend(name) -> Backend:
    """The backend called `name`; ConfigError naming the choices otherwise."""
    backend = BACKENDS.get(name) if isinstance(name, str) else None
    if backend is None:
        raise ConfigError(f"unknown backend {name!r}; choose {' or '.join(BACKENDS)}")
    return backend
