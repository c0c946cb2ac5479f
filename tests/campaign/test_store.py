"""Results folder: atomic parts, resume, corruption handling and plan mismatch."""

import json
import os
import struct

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flipsafe.campaign import ROW_SCHEMA, CampaignPlan, ResultsStore, content_checksum
from flipsafe.campaign import store as store_module
from flipsafe.errors import CampaignError


def _plan(**changes):
    fields = {"model": "runs/a", "model_sha": "abc123", "dataset": "cifar10", "format": "fp16",
              "n": 10, "seed": 1, "part_size": 3}
    return CampaignPlan(**{**fields, **changes})


def _rows(ids):
    # Values derived from the fault id so every row is distinct and checkable.
    n = len(ids)
    return {
        "fault_id": list(ids),
        "layer": [f"layer{i % 2}" for i in ids],
        "field": ["mantissa" if i % 3 else "exponent" for i in ids],
        "site": ["activations"] * n,
        "param": ["output"] * n,
        "index": [100 + i for i in ids],
        "bits": [list(range(i % 3)) for i in ids],  # [], [0], [0, 1] ...
        "fault_model": ["bitflip"] * n,
        "format": ["fp16"] * n,
        "image_id": [i // 2 for i in ids],
        "golden_top1": [i % 10 for i in ids],
        "faulty_top1": [(i * 7) % 10 for i in ids],
        "sdc": [i % 10 != (i * 7) % 10 for i in ids],
        "due": [i == 4 for i in ids],
        "nonfinite": [i == 4 for i in ids],
        "golden_loss": [0.25 * i for i in ids],
        "faulty_loss": [float("inf") if i == 4 else 0.5 * i for i in ids],
        "delta_loss": [float("inf") if i == 4 else 0.25 * i for i in ids],
        "golden_top2diff": [1.0 + i for i in ids],
        "faulty_top2diff": [float("nan") if i == 4 else -1.0 - i for i in ids],
        "detected": [i % 4 == 1 for i in ids],
        "corrected": [i % 4 == 2 for i in ids],
        "decided": [i % 5 == 3 for i in ids],
    }


def _table(ids):
    return pa.table(_rows(ids))


@pytest.fixture
def store(tmp_path):
    s = ResultsStore(tmp_path / "out")
    # 7 rows in parts of 3: parts 0, 1 hold 3 rows and part 2 holds 1.
    assert s.create_or_resume(_plan(), total_rows=7) is False
    return s


def test_new_campaign_writes_plan_and_manifest(store):
    out = store.out_dir
    assert CampaignPlan.from_json((out / "plan.json").read_text()) == _plan()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == {"fingerprint": _plan().fingerprint(), "total_rows": 7, "part_size": 3,
                        "parts": 3}
    assert store.n_parts == 3
    assert [store.expected_rows(k) for k in range(3)] == [3, 3, 1]
    with pytest.raises(CampaignError, match="out of range"):
        store.expected_rows(3)


def test_rows_read_back_equal_rows_written_sorted_by_fault_id(store):
    # Parts written out of order and with rows shuffled inside a part.
    store.write_part(2, _table([6]))
    store.write_part(0, _table([2, 0, 1]))
    store.write_part(1, _table([5, 3, 4]))
    assert store.completed_parts() == {0, 1, 2}
    got = store.read()
    assert got.schema.equals(ROW_SCHEMA)
    expected = _rows(range(7))
    for name, values in got.to_pydict().items():
        if name == "faulty_top2diff":
            # NaN != NaN, so compare with the NaN position checked separately.
            assert [v for i, v in enumerate(values) if i != 4] == [
                v for i, v in enumerate(expected[name]) if i != 4
            ]
            assert values[4] != values[4]
        else:
            assert values == expected[name], name


def test_empty_store_reads_empty_table(store):
    got = store.read()
    assert got.num_rows == 0 and got.schema.equals(ROW_SCHEMA)


def test_resume_detects_completed_parts(store):
    store.write_part(0, _table([0, 1, 2]))
    store.write_part(2, _table([6]))
    again = ResultsStore(store.out_dir)
    assert again.create_or_resume(_plan(), total_rows=7) is True
    assert again.completed_parts() == {0, 2}
    assert again.missing_parts() == [1]


def test_moved_checkpoint_still_resumes(store):
    assert ResultsStore(store.out_dir).create_or_resume(_plan(model="/new/place"), 7) is True


def test_different_plan_is_refused_naming_the_field(store):
    with pytest.raises(CampaignError, match=r"seed \(1 there, 2 now\).*another --out"):
        ResultsStore(store.out_dir).create_or_resume(_plan(seed=2), 7)
    with pytest.raises(CampaignError, match="fault.*format|format.*fault"):
        ResultsStore(store.out_dir).create_or_resume(_plan(fault="zero", format="bf16"), 7)


def test_same_plan_with_other_row_total_is_refused(store):
    with pytest.raises(CampaignError, match="7 result rows.*expects 8"):
        ResultsStore(store.out_dir).create_or_resume(_plan(), 8)


def test_parts_without_plan_are_refused(tmp_path):
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "part-000000.parquet").write_bytes(b"x")
    with pytest.raises(CampaignError, match="plan.json is missing"):
        ResultsStore(tmp_path).create_or_resume(_plan(), 7)


def test_a_lost_plan_is_restored_from_the_same_plan_and_nothing_is_deleted(store):
    store.write_part(0, _table([0, 1, 2]))
    (store.out_dir / "plan.json").unlink()
    with pytest.raises(CampaignError, match="rerun its `flipsafe campaign` command"):
        ResultsStore(store.out_dir).open()
    for other, rows in ((_plan(seed=2), 7), (_plan(), 8)):
        with pytest.raises(CampaignError, match="original settings.*nothing there is deleted") as info:
            ResultsStore(store.out_dir).create_or_resume(other, rows)
        assert "remove" not in str(info.value)
    assert not (store.out_dir / "plan.json").exists()
    again = ResultsStore(store.out_dir)
    assert again.create_or_resume(_plan(), 7) is True
    assert CampaignPlan.from_json((store.out_dir / "plan.json").read_text()) == _plan()
    assert again.missing_parts() == [1, 2]
    assert again.read()["fault_id"].to_pylist() == [0, 1, 2]


def test_write_part_checks_rows(store):
    with pytest.raises(CampaignError, match="must have 3 rows, got 2"):
        store.write_part(0, _table([0, 1]))
    rows = _rows([0, 1, 2])
    del rows["due"]
    with pytest.raises(CampaignError, match=r"missing \['due'\]"):
        store.write_part(0, pa.table(rows))
    rows = _rows([0, 1, 2])
    rows["golden_loss"] = [0.0, None, 1.0]
    with pytest.raises(CampaignError, match="golden_loss have missing values"):
        store.write_part(0, pa.table(rows))
    assert not any(store.parts_dir.iterdir())


def test_failed_write_leaves_no_partial_file(store, monkeypatch):
    store.write_part(0, _table([0, 1, 2]))
    good = store.part_path(0).read_bytes()

    def half_write(table, where, **kwargs):
        where.write(b"PAR1 half a part")
        raise OSError("disk full")

    monkeypatch.setattr(store_module.pq, "write_table", half_write)
    with pytest.raises(OSError, match="disk full"):
        store.write_part(1, _table([3, 4, 5]))
    with pytest.raises(OSError, match="disk full"):
        store.write_part(0, _table([0, 1, 2]))
    monkeypatch.undo()
    # Neither the new part nor a temp file exists, and the earlier part is untouched.
    assert sorted(p.name for p in store.parts_dir.iterdir()) == ["part-000000.parquet"]
    assert store.part_path(0).read_bytes() == good
    assert store.completed_parts() == {0}


def test_temp_left_by_a_killed_writer_is_ignored_and_cleared_by_the_lock_holder(store):
    store.write_part(0, _table([0, 1, 2]))
    stale = store.parts_dir / ".part-000001.parquet.tmp-999"
    stale.write_bytes(store.part_path(0).read_bytes()[:50])
    assert store.completed_parts() == {0}
    # Without the writer lock the temp may be another writer's part in flight: kept.
    ResultsStore(store.out_dir).create_or_resume(_plan(), 7)
    assert stale.exists()
    writer = ResultsStore(store.out_dir)
    with writer.lock():
        writer.create_or_resume(_plan(), 7)
    assert not stale.exists()


def test_second_writer_is_refused_and_leaves_the_first_ones_temps(store):
    in_flight = store.parts_dir / f".part-000001.parquet.tmp-{os.getpid()}"
    with store.lock():
        in_flight.write_bytes(b"half a part")
        second = ResultsStore(store.out_dir)
        with pytest.raises(CampaignError, match=r"in use by another campaign \(pid \d+"), \
                second.lock():
            pass  # pragma: no cover - never entered
        assert not second.is_writer
        assert in_flight.read_bytes() == b"half a part"
    # Released when the first writer is done: the next one gets it.
    with second.lock():
        assert second.is_writer
    assert not second.is_writer


def test_lock_is_refused_across_processes(store):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from flipsafe.campaign import ResultsStore\n"
        "from flipsafe.errors import CampaignError\n"
        "try:\n"
        "    with ResultsStore(sys.argv[1]).lock():\n"
        "        print('locked')\n"
        "except CampaignError as exc:\n"
        "    print(exc)\n"
    )
    run = [sys.executable, "-c", code, str(store.out_dir)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with store.lock():
        held = subprocess.run(run, check=False, capture_output=True, text=True, timeout=60, env=env)
    assert f"in use by another campaign (pid {os.getpid()}" in held.stdout, held.stderr
    free = subprocess.run(run, check=False, capture_output=True, text=True, timeout=60, env=env)
    assert free.stdout.strip() == "locked", free.stderr


def _value_byte(path, column, value):
    # Offset of a byte of `value` (little-endian float64) inside the column's pages.
    meta = pq.ParquetFile(path).metadata.row_group(0)
    chunk = next(meta.column(i) for i in range(meta.num_columns)
                 if meta.column(i).path_in_schema == column)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    region = path.read_bytes()[start:start + chunk.total_compressed_size]
    return start + region.index(struct.pack("<d", value)[-2:])


def _damage(path, damage) -> bytes:
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        # golden_loss 1.25 (row 5) is 0x3FF4000000000000; f4 -> f5 reads back as 1.3125.
        data[_value_byte(path, "golden_loss", 1.25)] ^= 0x01
    path.write_bytes(bytes(data))
    return bytes(data)


@pytest.mark.parametrize("damage", ["truncate", "flip_value_byte"])
def test_corrupt_part_is_reported_missing_and_moved_aside_by_the_writer(store, damage):
    store.write_part(0, _table([0, 1, 2]))
    store.write_part(1, _table([3, 4, 5]))
    path = store.part_path(1)
    data = _damage(path, damage)
    aside = store.parts_dir / "corrupt-part-000001-0.parquet"
    with store.lock():
        assert store.completed_parts() == {0}
        assert store.damaged == [aside]
        assert not path.exists()
        assert aside.read_bytes() == data
        assert store.read()["fault_id"].to_pylist() == [0, 1, 2]
        # A second bad copy of the same part does not overwrite the first.
        path.write_bytes(b"junk")
        assert store.completed_parts() == {0}
    assert (store.parts_dir / "corrupt-part-000001-1.parquet").read_bytes() == b"junk"


@pytest.mark.parametrize("damage", ["truncate", "flip_value_byte"])
def test_readers_skip_damaged_parts_without_touching_any_file(store, damage):
    store.write_part(0, _table([0, 1, 2]))
    store.write_part(1, _table([3, 4, 5]))
    path = store.part_path(1)
    data = _damage(path, damage)
    before = sorted(p.name for p in store.parts_dir.iterdir())
    for _ in range(2):  # e.g. two `flipsafe summary` runs on the folder
        reader = ResultsStore(store.out_dir)
        reader.open()
        assert reader.read()["fault_id"].to_pylist() == [0, 1, 2]
        assert reader.completed_parts() == {0}
        assert reader.damaged == [path]
    assert sorted(p.name for p in store.parts_dir.iterdir()) == before
    assert path.read_bytes() == data


def test_part_whose_values_disagree_with_its_checksum_is_rejected(store):
    # A well-formed Parquet file with this plan's metadata but one changed value.
    store.write_part(1, _table([3, 4, 5]))
    path = store.part_path(1)
    table = pq.read_table(path)
    metadata = table.schema.metadata
    changed = table.set_column(
        table.schema.get_field_index("index"), "index", pa.array([103, 104, 999], pa.int64())
    ).replace_schema_metadata(metadata)
    pq.write_table(changed, path)
    assert store.completed_parts() == set()


def test_content_checksum_ignores_chunking_but_not_values():
    whole = _table(range(6))
    chunked = pa.concat_tables([_table(range(2)), _table(range(2, 6))])
    assert content_checksum(whole) == content_checksum(chunked)
    # Moving an element between neighbouring lists keeps the flat values the same.
    rows = _rows(range(6))
    rows["bits"][1], rows["bits"][2] = [0, 0], [1]  # was [0], [0, 1]
    assert content_checksum(pa.table(rows)) != content_checksum(whole)
    rows = _rows(range(6))
    rows["layer"][0], rows["layer"][1] = "layer0l", "ayer1"  # same characters, new split
    assert content_checksum(pa.table(rows)) != content_checksum(whole)


def test_part_from_another_plan_or_slot_is_not_counted(store, tmp_path):
    other = ResultsStore(tmp_path / "other")
    other.create_or_resume(_plan(seed=9), 7)
    other.write_part(1, _table([3, 4, 5]))
    os.replace(other.part_path(1), store.part_path(1))
    # Part 0's file renamed to slot 2 has the wrong part id and row count.
    store.write_part(0, _table([0, 1, 2]))
    os.replace(store.part_path(0), store.part_path(2))
    with store.lock():
        assert store.completed_parts() == set()
    assert sorted(p.name for p in store.parts_dir.iterdir()) == [
        "corrupt-part-000001-0.parquet", "corrupt-part-000002-0.parquet"
    ]


def test_open_reads_an_existing_campaign(store):
    store.write_part(2, _table([6]))
    reader = ResultsStore(store.out_dir)
    assert reader.open() == _plan()
    assert reader.total_rows == 7
    assert reader.read()["fault_id"].to_pylist() == [6]
    with pytest.raises(CampaignError, match="no plan.json"):
        ResultsStore(store.out_dir / "nowhere").open()


def test_damaged_plan_or_manifest_is_refused(store):
    (store.out_dir / "manifest.json").write_text("[1, 2]")
    with pytest.raises(CampaignError, match="manifest.json is damaged"):
        ResultsStore(store.out_dir).create_or_resume(_plan(), 7)
    (store.out_dir / "plan.json").write_text('{"model": "m"')
    with pytest.raises(CampaignError, match="plan.json cannot be used.*another --out"):
        ResultsStore(store.out_dir).create_or_resume(_plan(), 7)


def test_campaign_whose_checkpoint_changed_says_so(store):
    # The same plan on a retrained checkpoint: only the weights hash differs.
    with pytest.raises(CampaignError) as info:
        ResultsStore(store.out_dir).create_or_resume(_plan(model_sha="def456"), 7)
    message = str(info.value)
    assert "checkpoint at runs/a changed since" in message
    assert "now def456" in message and "ran on abc123" in message
    assert "restore the original checkpoint" in message
