"""CUDA: the engine on a GPU gives the CPU's outcomes (these tests skip without a GPU;
benchmarks/gpu.py runs them with the GPU-vs-CPU campaign comparison)."""

import pytest
import torch

from flipsafe import models
from flipsafe.inject import Engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("site", ["activations", "weights"])
def test_gpu_outcomes_are_the_cpus(site, fmt):
    torch.manual_seed(0)
    model = models.build("mlp", 10, in_channels=1, image_size=8).eval()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(10, (16,))
    cpu = Engine(model, fmt)
    gpu = Engine(model, fmt, device="cuda")
    if cpu.needs_ranges:
        gpu.set_ranges(cpu.profile(x))
    faults = cpu.sample(400, site, images=16, generator=torch.Generator().manual_seed(1))
    a, b = cpu.run(faults, x, y), gpu.run(faults, x, y)
    # A Linear-only model on 16 images: no reduction is long enough for the devices'
    # summation orders to move a top-1 decision of these logits.
    assert torch.equal(a.sdc, b.sdc.cpu()) and torch.equal(a.faulty_top1, b.faulty_top1.cpu())
    assert torch.equal(a.due, b.due.cpu())

