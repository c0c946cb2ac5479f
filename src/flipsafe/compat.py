"""The one place flipsafe touches third-party private names (torch, ray, transformers, onnx,
torchao). Each is wrapped here, so a release that moves one breaks one line, and a test
(tests/test_registries.py) keeps every other module off them.
"""

from __future__ import annotations

import contextlib
import logging

from torch import nn

# Base classes torch keeps private: every Conv / ConvTranspose, every BatchNorm, every
# InstanceNorm.
ConvNd = nn.modules.conv._ConvNd
BatchNorm = nn.modules.batchnorm._BatchNorm
InstanceNorm = nn.modules.instancenorm._InstanceNorm

# Loggers of torch.export's internals and of Ray's per-run token notice.
TORCH_EXPORT_LOGGERS = ("torch._export", "torch.export")
RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
# What torchao logs as it imports (directly, or from transformers when installed): the
# GPU kernels it cannot load on a CPU machine, and torch's note on one of its enums.
IMPORT_NOISE_LOGGERS = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def quiet_imports():
    """Optional libraries imported inside the block log only errors (IMPORT_NOISE_LOGGERS)."""
    loggers = [logging.getLogger(n) for n in IMPORT_NOISE_LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def conv_padding(conv) -> list[int]:
    """The F.pad widths of a Conv with a padding_mode other than zeros, as its forward
    applies them."""
    return conv._reversed_padding_repeated_twice


def is_aten_op(op) -> bool:
    """Whether a graph node's target is an ATen operator overload (torch.ops.aten.*.*)."""
    import torch

    return isinstance(op, torch._ops.OpOverload)


def is_mutable(op) -> bool:
    """Whether ATen operator overload `op` writes into one of its arguments."""
    return bool(op._schema.is_mutable)


def overload_name(op) -> str:
    """The overload part of an ATen operator overload's name ('default', 'Tensor', ...)."""
    return op._overloadname


def returns_view(op) -> bool:
    """Whether ATen operator overload `op` returns a view of (an alias into) an argument."""
    return any(r.alias_info is not None for r in op._schema.returns)


def torchscript_to_export(scripted, sample: tuple):
    """A torch.export ExportedProgram of TorchScript module `scripted` run on `sample`."""
    from torch._export.converter import TS2EPConverter

    return TS2EPConverter(scripted, sample).convert()


def ray_worker():
    """Ray's driver-side worker module (it owns the printer of worker output), or None when
    this Ray version has none."""
    try:
        from ray._private import worker
    except ImportError:
        return None
    return worker
