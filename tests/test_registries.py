"""Registries look names up and the classes they return carry the behaviour: no code in src/
compares a string against a protection, site, target-kind or backend name."""

import ast
import pathlib

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "flipsafe"


# The same word in another vocabulary: (file, name) -> what it is there.
OTHER_MEANINGS = {
    ("textguided/encoders.py", "clip"): "a text-encoder kind (clip:<model>), not the protection",
}


def registered_names() -> dict[str, set[str]]:
    """{family: names} of every name a registry owns. Sites are the names --site takes
    (faults.SITE_SPECS); the FaultSet params a site corrupts ('output', 'weight', 'bias')
    are also nn.Module attribute names the engine reads, and stay out."""
    from flipsafe.campaign.backends import BACKENDS
    from flipsafe.campaign.plan import TARGET_PREFIXES
    from flipsafe.faults import SITE_SPECS
    from flipsafe.protect.registry import names

    return {"protection": set(names()), "site": set(SITE_SPECS),
            "target kind": {*TARGET_PREFIXES, "flipsafe"}, "backend": set(BACKENDS)}


def _strings(node) -> list[str]:
    """String constants of a comparison operand (itself, or the items of a literal tuple,
    list or set)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for e in node.elts for s in _strings(e)]
    return []


def name_comparisons(root: pathlib.Path = SRC) -> list[str]:
    """'file:line family name' for every ==, !=, in, not in or match/case of a string
    against a registered name in the Python files under `root`."""
    families = registered_names()
    found = []
    for f in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                if not any(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn))
                           for op in node.ops):
                    continue
                values = [s for operand in (node.left, *node.comparators)
                          for s in _strings(operand)]
            elif isinstance(node, ast.match_case):
                values = [n.value.value for n in ast.walk(node.pattern)
                          if isinstance(n, ast.MatchValue) and isinstance(n.value, ast.Constant)
                          and isinstance(n.value.value, str)]
            else:
                continue
            where = str(f.relative_to(root))
            for family, names in families.items():
                for v in values:
                    if v in names and (where, v) not in OTHER_MEANINGS:
                        found.append(f"{where}:{getattr(node, 'lineno', None) or node.pattern.lineno} {family} {v!r}")
    return found


def test_no_string_is_compared_against_a_registered_name():
    assert name_comparisons() == []


def test_the_check_finds_such_a_comparison(tmp_path):
    # The walk itself: a comparison of each family is found, a lookup is not.
    code = ("def f(p, s, k, b, d):\n"
            "    if p.name in ('ecc', 'parity'):\n        pass\n"
            "    if s == 'weights':\n        pass\n"
            "    match k:\n        case 'hf':\n            pass\n"
            "    return b != 'ray' or d['ecc']\n")
    (tmp_path / "mod.py").write_text(code)
    found = name_comparisons(tmp_path)
    assert [x.split(" ", 1)[1] for x in found] == [
        "protection 'ecc'", "protection 'parity'", "site 'weights'", "target kind 'hf'",
        "backend 'ray'"]


THIRD_PARTY = ("torch", "nn", "F", "fx", "ray", "transformers", "onnx", "onnxruntime", "torchao")
# Private attributes of third-party objects (ATen operator overloads, Conv modules).
PRIVATE_ATTRS = {"_schema", "_overloadname", "_reversed_padding_repeated_twice"}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.endswith("__")


def private_uses(root: pathlib.Path = SRC) -> list[str]:
    """'file:line name' for every import from, or attribute of, a third-party private name
    outside flipsafe/compat.py."""
    found = []
    for f in sorted(root.rglob("*.py")):
        where = str(f.relative_to(root))
        if where == "compat.py":
            continue
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                parts = node.module.split(".")
                if parts[0] in THIRD_PARTY and any(map(_private, parts)):
                    found.append(f"{where}:{node.lineno} {node.module}")
            elif isinstance(node, ast.Attribute):
                chain, base = [node.attr], node.value
                while isinstance(base, ast.Attribute):
                    chain.append(base.attr)
                    base = base.value
                rooted = isinstance(base, ast.Name) and base.id in THIRD_PARTY
                if (rooted and _private(node.attr)) or node.attr in PRIVATE_ATTRS:
                    found.append(f"{where}:{node.lineno} .{node.attr}")
    return found


def test_third_party_private_names_live_in_compat_only():
    assert private_uses() == []


def test_the_private_name_check_finds_them(tmp_path):
    (tmp_path / "mod.py").write_text(
        "from torch._export.converter import X\n"
        "import torch\n"
        "a = torch.nn.modules.conv._ConvNd\n"
        "b = op._schema.is_mutable\n"
        "c = self._mine + torch.__version__\n")
    assert [x.split(" ", 1)[1] for x in private_uses(tmp_path)] == [
        "torch._export.converter", "._ConvNd", "._schema"]
