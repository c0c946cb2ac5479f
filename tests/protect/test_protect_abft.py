"""abft against checksums computed by hand with F.conv2d / matmul: the whole fault space of
a tiny conv's outputs (every element x every bit), and weight faults with clean filters."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from protect_models import FAULT_COLUMNS, data, flip, rows, tiny

from flipsafe.errors import ConfigError
from flipsafe.formats import get
from flipsafe.protect.abft import unit_roundoff

U = 2.0 ** -24  # fp32: u = 2^-(23+1)


def _conv_check(model, x, y):
    """(|sum_c y_c - reference|, tolerance) by hand for conv '0' (float64), per position."""
    w, b = model[0].weight.detach().double(), model[0].bias.detach().double()
    x = x.double()
    ref = F.conv2d(x, w.sum(0, keepdim=True), padding=1)[:, 0] + b.sum()
    scale = F.conv2d(x.abs(), w.abs().sum(0, keepdim=True), padding=1)[:, 0] + b.abs().sum()
    k = 2 * 3 * 3  # terms per output
    tol = U / (1 - U) * y.double().abs().sum(1) + 3 * 2.0 ** -150 + (k + 1) * U * scale
    return (y.double().sum(1) - ref).abs(), tol


def test_unit_roundoff_of_formats():
    assert unit_roundoff(get("fp32")) == (2.0 ** -24, 2.0 ** -150)
    assert unit_roundoff(get("fp16")) == (2.0 ** -11, 2.0 ** -25)
    assert unit_roundoff(get("bf16"))[0] == 2.0 ** -8
    with pytest.raises(ConfigError, match="floating-point"):
        unit_roundoff(get("int8"))


def test_abft_flags_exactly_the_output_faults_beyond_its_tolerance(tmp_path):
    model = tiny()
    xy = data(model, n=12)
    x, _ = xy
    plan = {"layers": "0", "n": "all"}
    bare = rows(model, xy, tmp_path / "bare", **plan)
    prot = rows(model, xy, tmp_path / "abft", protect="abft:layers=0", **plan)
    assert prot.num_rows == 3 * 5 * 5 * 32  # the whole fault space: every element x bit
    for c in FAULT_COLUMNS:
        assert bare.column(c).to_pylist() == prot.column(c).to_pylist(), c
    # Every image has faults, so the campaign's golden run is of this very batch.
    assert sorted(set(prot.column("image_id").to_pylist())) == list(range(12))
    with torch.no_grad():
        gold = model[0](x)
    # Clean outputs are never flagged: the tolerance bounds the float32 rounding.
    clean_diff, clean_tol = _conv_check(model, x, gold)
    assert (clean_diff <= clean_tol).all()
    image = torch.tensor(prot.column("image_id").to_pylist())
    index = prot.column("index").to_pylist()
    bits = prot.column("bits").to_pylist()
    faulty = gold[image].clone()
    for i in range(len(index)):
        row = faulty[i].reshape(-1)
        row[index[i]] = flip(row[index[i]], bits[i])
    diff, tol = _conv_check(model, x[image], faulty)
    want = (~(diff <= tol)).flatten(1).any(1).numpy()
    got = prot.column("detected").to_numpy()
    assert np.array_equal(got, want)
    assert 0 < got.sum() < len(got)  # low mantissa bits hide below the tolerance
    # What the tolerance means: a fault whose change of the checksum exceeds the tolerance
    # plus the clean rounding is detected; one below the tolerance less it is not.
    change = (faulty.double().sum(1) - gold[image].double().sum(1)).abs()
    e = clean_diff[image]
    above = (~(change <= tol + e)).flatten(1).any(1).numpy()
    below = (change < tol - e).flatten(1).all(1).numpy()
    assert got[above].all() and not got[below].any()
    assert above.sum() > 0 and below.sum() > 0
    # A detected fault is no SDC; the other outcomes are the unprotected ones.
    sdc, bare_sdc = prot.column("sdc").to_numpy(), bare.column("sdc").to_numpy()
    assert not sdc[got].any()
    assert np.array_equal(sdc[~got], bare_sdc[~got])


def test_abft_on_weight_faults_checks_the_faulty_output_against_clean_filters(tmp_path):
    model = tiny()
    xy = data(model, n=12)
    x, _ = xy
    plan = {"site": "weights", "layers": "0|3", "n": 150}
    prot = rows(model, xy, tmp_path / "w", protect="abft", **plan)
    bare = rows(model, xy, tmp_path / "b", **plan)
    for c in FAULT_COLUMNS:
        assert bare.column(c).to_pylist() == prot.column(c).to_pylist(), c
    layer = prot.column("layer").to_pylist()
    index = prot.column("index").to_pylist()
    image = prot.column("image_id").to_pylist()
    bits = prot.column("bits").to_pylist()
    got = prot.column("detected").to_numpy()
    with torch.no_grad():
        hidden = F.relu(model[0](x)).flatten(1)
    clear = 0
    for i in range(len(layer)):
        mod = model[int(layer[i])]
        w = mod.weight.detach().clone().reshape(-1)
        w[index[i]] = flip(w[index[i]], bits[i])
        w = w.reshape(mod.weight.shape)
        with torch.no_grad():
            if layer[i] == "0":
                y = F.conv2d(x[image[i]:image[i] + 1], w, mod.bias, padding=1)
                diff, tol = _conv_check(model, x[image[i]:image[i] + 1], y)
            else:
                h = hidden[image[i]:image[i] + 1].double()
                y = F.linear(hidden[image[i]:image[i] + 1], w, mod.bias)
                wc, bc = mod.weight.detach().double(), mod.bias.detach().double()
                diff = (y.double().sum(1) - (h @ wc.sum(0) + bc.sum())).abs()
                tol = (U / (1 - U) * y.double().abs().sum(1) + 4 * 2.0 ** -150
                       + (75 + 1) * U * (h.abs() @ wc.abs().sum(0) + bc.abs().sum()))
        # Faulty outputs here come from one-image convolutions, the engine's from a batch:
        # the two may round differently, so only decisions clear of the threshold by more
        # than a rounding step must agree.
        clearly_flagged = bool((~(diff <= tol * (1 + 1e-3))).any())
        clearly_not = bool((diff < tol * (1 - 1e-3)).all())
        if clearly_flagged or clearly_not:
            assert clearly_flagged == bool(got[i]), i
            clear += 1
    assert clear >= 0.9 * len(layer)
    assert got.any() and not got.all()


def test_abft_needs_a_conv_or_linear_layer(tmp_path):
    model = tiny()
    # The error lists the layers abft could take (Conv 0 and Linear 3), not the ones chosen.
    with pytest.raises(ConfigError, match=r"abft checks Conv and Linear.*selects none of them "
                                          r"\(choose from: 0, 3\)$"):
        rows(model, data(model), tmp_path / "x", protect="abft:layers=Flatten|ReLU", n=5,
             layers="0")
