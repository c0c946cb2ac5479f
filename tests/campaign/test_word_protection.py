"""SECDED and parity against multi-bit upsets in 64-bit weight words: one flipped bit is
corrected, two adjacent ones detected, three adjacent ones always miscorrected (their
syndrome names a real bit); parity sees odd counts only."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from flipsafe.cli import main


def rows(out):
    import pyarrow as pa

    return pa.concat_tables([pq.read_table(p) for p in sorted((out / "parts").glob("*.parquet"))])


@pytest.mark.parametrize("fault, protect, corrected, detected", [
    ("bitflip", "ecc", 1.0, 0.0), ("burst2", "ecc", 0.0, 1.0), ("burst3", "ecc", 0.0, 0.0),
    ("bitflip", "parity", 0.0, 1.0), ("burst2", "parity", 0.0, 0.0)])
def test_memory_codes_against_word_upsets(mlp_checkpoint, tmp_path, capsys, fault, protect,
                                          corrected, detected):
    out = tmp_path / "r"
    assert main(["campaign", str(mlp_checkpoint), "--site", "weight_words", "--word-bits",
                 "64", "--format", "int8", "--fault", fault, "--n", "40", "--protect",
                 protect, "--out", str(out)]) == 0
    t = rows(out)
    n = t.num_rows
    assert n >= 40
    assert sum(t["corrected"].to_pylist()) == corrected * n
    assert sum(t["detected"].to_pylist()) == detected * n
    if corrected or detected:  # nothing wrong reaches the model
        assert not any(t["sdc"].to_pylist()) or protect == "parity" and not detected


def test_memory_codes_need_their_own_word_width(mlp_checkpoint, tmp_path, capsys):
    code = main(["campaign", str(mlp_checkpoint), "--site", "weight_words", "--word-bits",
                 "32", "--format", "int8", "--n", "5", "--protect", "ecc", "--out",
                 str(tmp_path / "r")])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and len(err) == 1 and "--word-bits 64" in err[0]
