"""The demo writes and names one report per campaign, each with its own title."""

import dataclasses
import io
import re

from rich.console import Console

from flipsafe import demo


def test_demo_prints_every_report_it_writes(tmp_path, monkeypatch, capfd):
    # The demo's flow on a small model and tiny campaigns; its own sizes take minutes.
    full = demo.demo_campaigns
    # The all-layer campaign is dup's map: it needs SDCs to choose channels from (a budget
    # that chooses none is refused), so it gets more faults than the others.
    monkeypatch.setattr(demo, "demo_campaigns", lambda quick: tuple(
        demo.DemoCampaign(c.name, c.layers, 64 if c.name == "all-layers" else 8, c.clamp)
        for c in full(quick)))
    hardening = demo.demo_hardening
    monkeypatch.setattr(demo, "demo_hardening", lambda quick: tuple(
        dataclasses.replace(h, n=8) for h in hardening(quick)))
    buf = io.StringIO()
    done = demo.run_demo(tmp_path / "d", quick=True, console=Console(file=buf, width=200),
                         study=demo.DemoStudy(arch="mlp"))
    printed = buf.getvalue()
    names = [c.name for c in full(True)] + [h.name for h in hardening(True)]
    assert set(done["reports"]) == set(names) and "last-layer-clamped" in names
    titles = set()
    for name, path in done["reports"].items():
        assert path.is_file() and re.search(rf"^{name} +{re.escape(str(path))}$", printed,
                                            re.MULTILINE)
        titles.add(re.search(r"<title>(.*?)</title>", path.read_text(encoding="utf-8")).group(1))
    assert len(titles) == len(names)  # every report says which campaign it shows
    assert done["report"] == tmp_path / "d" / "report.html"
    assert "Loading weights" not in capfd.readouterr().err
    for h in hardening(True):  # each hardening report holds its table and Pareto plot
        page = done["reports"][h.name].read_text(encoding="utf-8")
        assert "Protections" in page and "SDC rate against cost" in page
        for spec in h.protections:
            assert spec.split(":")[0] in page
