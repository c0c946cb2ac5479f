"""The Python front door: a model, data and a fault plan make a campaign; run it, then read,
compare and report its results.

    import flipsafe
    campaign = flipsafe.Campaign(model, (images, labels), flipsafe.FaultPlan(n=200),
                                 out="results/mine")
    results = campaign.run()
    print(results.summary())

The campaign is resumable: running the same campaign into the same folder again keeps the
finished parts. The folder is the same as `flipsafe campaign --out` writes, so
`flipsafe summary` and `flipsafe report` read it too.
"""

from __future__ import annotations

from pathlib import Path

from flipsafe.campaign.plan import FaultPlan
from flipsafe.errors import ConfigError


class Campaign:
    """A fault-injection campaign: `plan` (a FaultPlan; default FaultPlan()) run on `model`
    over `data`, stored in results folder `out`.

    model: an nn.Module (its class scores are its output, or the output's `.logits`), or
    a spec string as `flipsafe campaign` takes (a `flipsafe train` folder, hf:<folder>,
    torchscript:<file>, export:<file>, onnx:<file>, python:<module>:<callable>).
    data: image and label tensors `(images, labels)` or a torch Dataset of (image, label)
    items, already as the model takes them; or a dataset spec string (digits,
    tensors:<file.safetensors>, ...), resized and normalised as the CLI does; or None
    for a `flipsafe train` folder's own dataset. In-memory data are named `data_name`
    in reports (default "memory:" and the first digits of their hash); campaigns are
    compared only on equally named data.
    device: "cpu", "cuda" or "auto". classes: class names of in-memory data, checked
    against the model's class count. preprocess: {"image_size", "mean", "std"} for
    spec-string data on a model that does not say its own. protect: protections replayed
    on the plan's very faults, e.g. "ranger,abft:layers=last,dup", or "ecc" for a weights
    plan (flipsafe.protect.spec).
    """

    def __init__(self, model, data=None, plan: FaultPlan | None = None, out=None, *,
                 device: str = "cpu", data_name: str | None = None,
                 classes: list[str] | None = None, preprocess: dict | None = None,
                 protect: str | None = None):
        from flipsafe.campaign.runner import make_plan, resolve_device
        from flipsafe.campaign.targets import resolve

        if out is None:
            raise ConfigError("give `out`, the results folder the campaign writes (and "
                              "resumes from)")
        if plan is not None and not isinstance(plan, FaultPlan):
            raise ConfigError(f"plan must be a flipsafe.FaultPlan, got {type(plan).__name__}")
        resolve_device(device)
        self.out = Path(out)
        self.device = device
        self.target = resolve(model)
        self.data = None
        fields = {}
        if data is None or isinstance(data, str):
            fields["dataset"] = data
            if preprocess:
                fields["preprocess"] = dict(preprocess)
        else:
            from flipsafe.campaign.runner import data_sha

            images, labels = _as_tensors(data)
            if classes is not None and len(classes) != 0:
                self._check_classes(images, labels, classes)
            self.data = (images, labels)
            fields["dataset"] = data_name or f"memory:{data_sha(images, labels)[:12]}"
        if protect is not None:
            fields["protect"] = protect
        self.plan = make_plan(self.target, plan or FaultPlan(), **fields)

    def _check_classes(self, images, labels, classes):
        from flipsafe.campaign.targets import check_model

        check_model(self.target, self.target.load(images[:2]), images, labels, list(classes))

    def run(self, progress: bool = False) -> CampaignResults:
        """Run the campaign (or resume it: finished parts are kept) and return its results."""
        from flipsafe.campaign.runner import run_campaign

        run_campaign(self.plan, self.out, show_progress=progress, device=self.device,
                     target=self.target, data=self.data)
        return CampaignResults(self.out)


class CampaignResults:
    """The results in a campaign folder (one `Campaign.run` or `flipsafe campaign` wrote)."""

    def __init__(self, folder, name: str | None = None):
        from flipsafe.report import load_results

        self.folder = Path(folder)
        self.results = load_results(self.folder, name=name)  # a flipsafe.report.Results

    @property
    def name(self) -> str:
        return self.results.name

    @property
    def by_layer(self) -> dict:
        """Per-layer figures: {layer: {"n", "sdc", "sdc_low", "sdc_high", "due", ...}}."""
        out = {}
        for key, g in self.results.by_layer.groups.items():
            layer = key[0] if isinstance(key, tuple) else key
            out[layer] = {"n": g.n, "sdc": g.sdc.rate, "sdc_low": g.sdc.low,
                          "sdc_high": g.sdc.high, "due": g.due.rate, "due_low": g.due.low,
                          "due_high": g.due.high}
        return out

    def summary(self) -> str:
        """The text `flipsafe summary FOLDER` prints: plan, per-layer rates with intervals."""
        from flipsafe.report import summary_table

        return summary_table(self.results)

    def compare(self, *others: CampaignResults) -> str:
        """The text `flipsafe summary FOLDER --vs OTHER...` prints: these results against
        campaigns of other models run with the same fault plan and data."""
        from flipsafe.report import summary_table, with_unique_names

        base, *rest = with_unique_names([self.results, *(_results(o) for o in others)])
        return summary_table(base, vs=rest)

    def report(self, path, *others: CampaignResults, fmt: str | None = None) -> Path:
        """Write an HTML (or Markdown, for a .md path or fmt="md") report of these results
        and of any `others` compared with them; returns the file written."""
        from flipsafe.report import write_report

        fmt = fmt or ("md" if str(path).endswith(".md") else "html")
        return write_report([self.folder, *(_results(o).dir for o in others)], path, fmt=fmt)

    def __repr__(self) -> str:
        return f"CampaignResults({str(self.folder)!r}, {self.results.n} injections)"


def _results(other):
    if isinstance(other, CampaignResults):
        return other.results
    if isinstance(other, (str, Path)):
        return CampaignResults(other).results
    raise ConfigError(f"compare with CampaignResults or a results folder, got "
                      f"{type(other).__name__}")


def _as_tensors(data):
    """(images, labels) tensors from a pair of tensors or a Dataset of (image, label)."""
    import torch
    from torch.utils.data import Dataset

    if isinstance(data, (tuple, list)) and len(data) == 2:
        images, labels = data
    elif isinstance(data, Dataset):
        try:
            items = [data[i] for i in range(len(data))]
        except TypeError:
            raise ConfigError("a Dataset given as data needs __len__ and __getitem__") from None
        if not items:
            raise ConfigError("the Dataset given as data is empty")
        images = torch.stack([torch.as_tensor(x) for x, _ in items])
        labels = torch.as_tensor([int(y) for _, y in items])
    else:
        raise ConfigError("data must be (images, labels) tensors, a torch Dataset of "
                          f"(image, label) items, or a dataset spec; got {type(data).__name__}")
    images, labels = torch.as_tensor(images), torch.as_tensor(labels)
    if images.dim() < 2 or not images.is_floating_point():
        raise ConfigError(f"images must be a float tensor [N, ...] (e.g. [N, C, H, W]), got "
                          f"{images.dtype} {list(images.shape)}")
    if labels.dim() != 1 or labels.is_floating_point() or len(labels) != len(images):
        raise ConfigError(f"labels must be {len(images)} integers (one per image), got "
                          f"{labels.dtype} {list(labels.shape)}")
    if len(labels) == 0 or int(labels.min()) < 0:
        raise ConfigError("labels must be class indices >= 0, and there must be images")
    return images.float().contiguous(), labels.long()
