"""Reading results folders back: summaries, model facts and clear errors for bad folders."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
from report_rows import BASELINE_LAYERS, N_PER_LAYER, make_rows, weights_sha, write_campaign

from flipsafe.campaign import ResultsStore
from flipsafe.errors import CampaignError
from flipsafe.report import check_same_plan, load_results, summary_table, write_report
from flipsafe.report.results import bit_positions


def test_summaries_count_the_rows_of_each_layer(campaigns):
    r = load_results(campaigns["baseline"])
    rows = make_rows(BASELINE_LAYERS, N_PER_LAYER, 1).to_pydict()
    assert r.n == len(rows["layer"])
    for layer in BASELINE_LAYERS:
        sdc = sum(s for s, lay in zip(rows["sdc"], rows["layer"]) if lay == layer)
        due = sum(d for d, lay in zip(rows["due"], rows["layer"]) if lay == layer)
        g = r.by_layer.groups[(layer,)]
        assert (g.n, g.sdc.k, g.due.k) == (N_PER_LAYER, sdc, due)
    top = [(lay, bits[0]) for lay, bits in zip(rows["layer"], rows["bits"])]
    assert sum(g.n for g in r.by_bit.groups.values()) == len(top)
    assert r.by_bit.groups[("fc", 30)].n == top.count(("fc", 30))
    assert {k[1] for k in r.by_field.groups} == {"sign", "exponent", "mantissa"}


def test_model_facts_come_from_the_checkpoint(campaigns, checkpoints):
    base = load_results(campaigns["baseline"])
    cos = load_results(campaigns["cosine"])
    assert (base.classifier_layer, cos.classifier_layer) == ("fc", "head.fc")
    config = json.loads((checkpoints["cosine"] / "config.json").read_text())
    assert cos.accuracy == config["accuracy"] and cos.head == "cosine"
    assert base.name == "baseline" and base.notes == []


def test_layers_match_across_heads_by_role(campaigns):
    cos = load_results(campaigns["cosine"])
    assert [cos.match_name(k[0]) for k in cos.by_layer.groups] == [
        "features.1", "features.3", "fc", "last"]
    assert cos.real_name("fc") == "backbone.fc"
    assert cos.matched.groups[("last",)].sdc.k == cos.by_layer.groups[("head.fc",)].sdc.k


def test_clean_evaluation_reproduces_the_recorded_accuracy(campaigns):
    r = load_results(campaigns["baseline"], evaluate=True)
    assert r.clean.probs.shape == (len(r.clean.labels), 10)
    np.testing.assert_allclose(r.clean.probs.sum(axis=1), 1.0)
    assert r.clean.accuracy == pytest.approx(r.accuracy, abs=1e-6)


def test_bit_positions_take_the_highest_bit_and_mark_bitless_faults():
    table = pa.table({"bits": pa.array([[3], [5, 6], [], [0]], pa.list_(pa.int16()))})
    assert bit_positions(table).tolist() == [3, 6, -1, 0]


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(CampaignError, match="does not exist"):
        load_results(tmp_path / "nowhere")


def test_folder_without_plan_is_refused(tmp_path):
    (tmp_path / "parts").mkdir()
    with pytest.raises(CampaignError, match="no plan.json"):
        load_results(tmp_path)


def test_a_file_is_refused(tmp_path):
    path = tmp_path / "report.html"
    path.write_text("x")
    with pytest.raises(CampaignError, match="is a file"):
        load_results(path)


def test_empty_campaign_is_refused(tmp_path, base_plan):
    write_campaign(tmp_path / "empty", base_plan, None)
    with pytest.raises(CampaignError, match="no result rows"):
        load_results(tmp_path / "empty")


def test_incomplete_campaign_is_reported_with_a_note(tmp_path, base_plan):
    rows = make_rows(BASELINE_LAYERS, N_PER_LAYER, 1)
    store = ResultsStore(tmp_path / "half")
    store.create_or_resume(base_plan, total_rows=rows.num_rows)
    store.write_part(0, rows.slice(0, base_plan.part_size))
    r = load_results(tmp_path / "half")
    assert r.n == base_plan.part_size
    assert any("incomplete" in note and f"{rows.num_rows:,}" in note for note in r.notes)


def test_partner_from_another_plan_is_refused_naming_the_fields(tmp_path, campaigns, base_plan):
    other = replace(base_plan, format="fp16", seed=3, model_sha="d" * 64)  # sha may differ
    write_campaign(tmp_path / "fp16", other, make_rows(BASELINE_LAYERS, N_PER_LAYER, 1))
    ref, odd = load_results(campaigns["baseline"]), load_results(tmp_path / "fp16")
    with pytest.raises(CampaignError, match="different plan") as err:
        check_same_plan(ref, odd)
    message = str(err.value)
    assert "format: 'fp32'" in message and "'fp16'" in message and "seed: 0" in message
    assert "model_sha" not in message
    with pytest.raises(CampaignError, match="format"):
        summary_table(ref, [odd])
    with pytest.raises(CampaignError, match="format"):
        write_report([campaigns["baseline"], tmp_path / "fp16"], tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_partners_may_differ_in_model_and_part_size(tmp_path, campaigns, base_plan, checkpoints):
    other = replace(base_plan, model=str(checkpoints["cosine"]),
                    model_sha=weights_sha(checkpoints, "cosine"), part_size=300)
    write_campaign(tmp_path / "c", other, make_rows(BASELINE_LAYERS, N_PER_LAYER, 5))
    check_same_plan(load_results(campaigns["baseline"]), load_results(tmp_path / "c"))


def test_moved_checkpoint_leaves_a_note_instead_of_failing(tmp_path, campaigns, checkpoints):
    moved = tmp_path / "ckpt"
    shutil.copytree(checkpoints["baseline"], moved)
    plan = replace(load_results(campaigns["baseline"]).plan, model=str(moved))
    write_campaign(tmp_path / "run", plan, make_rows(BASELINE_LAYERS, N_PER_LAYER, 1))
    shutil.rmtree(moved)
    r = load_results(tmp_path / "run", evaluate=True)
    assert r.classifier_layer is None and r.accuracy is None and r.clean is None
    assert any("could not be read" in note for note in r.notes)
    assert "could not be read" in summary_table(r)


def test_checkpoint_with_other_weights_is_not_described(tmp_path, base_plan):
    write_campaign(tmp_path / "run", replace(base_plan, model_sha="e" * 64),
                   make_rows(BASELINE_LAYERS, N_PER_LAYER, 1))
    r = load_results(tmp_path / "run", evaluate=True)
    assert r.accuracy is None and r.clean is None and r.classifier_layer is None
    assert any("other weights" in note for note in r.notes)


def test_damaged_part_is_noted_and_left_where_it_is(tmp_path, base_plan, capsys):
    from flipsafe.cli import main

    rows = make_rows(BASELINE_LAYERS, N_PER_LAYER, 1)
    store = ResultsStore(tmp_path / "dmg")
    store.create_or_resume(base_plan, total_rows=rows.num_rows)
    for k in range(store.n_parts):
        start = k * base_plan.part_size
        store.write_part(k, rows.slice(start, store.expected_rows(k)))
    victim = store.part_path(1)
    damaged = victim.read_bytes()[:100]
    victim.write_bytes(damaged)
    before = sorted(p.name for p in store.parts_dir.iterdir())
    r = load_results(tmp_path / "dmg")
    assert r.n == rows.num_rows - store.expected_rows(1)
    assert any("damaged" in note and victim.name in note for note in r.notes)
    # Read-only commands, run twice, report the part and change nothing.
    for _ in range(2):
        assert main(["summary", str(tmp_path / "dmg")]) == 0
        assert victim.name in capsys.readouterr().out
    assert sorted(p.name for p in store.parts_dir.iterdir()) == before
    assert victim.read_bytes() == damaged
