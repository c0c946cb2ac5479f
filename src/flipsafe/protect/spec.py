"""Protection specifications: the one owner of protection names, their options and the
sites each can guard.

A specification is a comma-separated list of protections, each a name followed by
`:key=value` options, e.g. ``ranger,abft:layers=last,ecc`` or
``dup:budget=10%:map=results/base``. `parse` validates it and returns `Protection`
items; `str()` of the tuple joined by commas (`canonical`) is what plans store and
fingerprint, so two spellings of one specification give one plan.
"""

from __future__ import annotations

from dataclasses import dataclass

from flipsafe.errors import ConfigError


@dataclass(frozen=True)
class Kind:
    """What a protection is: the sites it can guard, the options it takes and the outcome
    it can produce (one line, shown in errors and help)."""

    sites: tuple[str, ...]
    options: tuple[str, ...]
    does: str


# The order here is the canonical order of a specification.
KINDS: dict[str, Kind] = {
    "ecc": Kind(("weights",), ("layers",),
                "SECDED (72,64) over stored weight words: corrects 1 bit, detects 2"),
    "parity": Kind(("weights",), ("layers",),
                   "one parity bit per 64-bit weight word: detects odd flips"),
    "abft": Kind(("activations", "weights"), ("layers",),
                 "checksums on Conv/Linear outputs: detects"),
    "dup": Kind(("activations",), ("layers", "budget", "map"),
                "duplication with comparison (layers or vulnerable channels): detects"),
    "tmr": Kind(("activations",), ("layers", "budget", "map"),
                "triplication with a majority vote (layers or vulnerable channels): corrects"),
    "ranger": Kind(("activations", "weights"), ("layers", "per"),
                   "outputs clamped to the range profiled on training data"),
    "clip": Kind(("activations", "weights"), ("layers", "per"),
                 "outputs beyond the profiled range set to 0 (FT-ClipAct)"),
}
# Protections that cannot run together (they act on the same values in the same way).
EXCLUSIVE = (("ecc", "parity"), ("dup", "tmr"), ("ranger", "clip"))
PER = ("layer", "channel")


@dataclass(frozen=True)
class Protection:
    """One protection of a specification with its options (values as strings, sorted by
    key; validated by `parse`)."""

    name: str
    options: tuple[tuple[str, str], ...] = ()

    def get(self, key: str, default: str | None = None) -> str | None:
        return dict(self.options).get(key, default)

    @property
    def layers(self) -> str:
        """The layer selection it guards (as --layers takes it; default 'all')."""
        return self.get("layers", "all")

    @property
    def budget(self) -> float | None:
        """The FLOP budget of dup/tmr as a fraction of the model's FLOPs, or None."""
        b = self.get("budget")
        return None if b is None else _fraction(b, self.name)

    @property
    def per_channel(self) -> bool:
        return self.get("per", "layer") == "channel"

    def __str__(self) -> str:
        return ":".join([self.name] + [f"{k}={v}" for k, v in self.options])


def parse(spec: str | None, site: str | None = None) -> tuple[Protection, ...]:
    """The protections of `spec` (() for None, '' or 'none'), checked against `site` when
    given; ConfigError with one line for anything wrong."""
    if spec is None:
        return ()
    if not isinstance(spec, str):
        raise ConfigError(f"protect must be a string such as 'ranger,abft:layers=last', got "
                          f"{type(spec).__name__}")
    text = spec.strip()
    if text in ("", "none"):
        return ()
    items: dict[str, Protection] = {}
    for part in text.split(","):
        item = _item(part.strip())
        if item.name in items:
            raise ConfigError(f"protect names {item.name} twice in {spec!r}")
        items[item.name] = item
    for a, b in EXCLUSIVE:
        if a in items and b in items:
            raise ConfigError(f"protect cannot take both {a} and {b}; choose one")
    if site is not None:
        for item in items.values():
            kind = KINDS[item.name]
            if site not in kind.sites:
                raise ConfigError(_site_error(item.name, site, kind))
    return tuple(items[n] for n in KINDS if n in items)


def canonical(spec: str | None, site: str | None = None) -> str | None:
    """The one spelling of `spec` that plans store (None when it protects nothing)."""
    items = parse(spec, site)
    return ",".join(str(p) for p in items) or None


def _item(part: str) -> Protection:
    name, *opts = part.split(":")
    name = name.strip().lower()
    if name not in KINDS:
        raise ConfigError(f"unknown protection {name!r}; choose from: {', '.join(KINDS)} "
                          f"(options after ':', e.g. abft:layers=last, dup:budget=10%)")
    kind = KINDS[name]
    options: dict[str, str] = {}
    for opt in opts:
        key, eq, value = opt.partition("=")
        key, value = key.strip().lower(), value.strip()
        if key not in kind.options:
            raise ConfigError(f"{name} takes no option {key!r}; its options: "
                              f"{', '.join(kind.options)}")
        if not eq or not value:
            raise ConfigError(f"{name}:{key} needs a value, e.g. {name}:{key}="
                              f"{_EXAMPLES[key]}")
        if key in options:
            raise ConfigError(f"{name} sets {key} twice")
        if key == "budget":
            value = f"{_fraction(value, name) * 100:g}%"
        if key == "per" and value not in PER:
            raise ConfigError(f"{name}:per must be one of: {', '.join(PER)}; got {value!r}")
        options[key] = value
    if "map" in options and "budget" not in options:
        raise ConfigError(f"{name}:map chooses channels under a budget; add {name}:budget=P%")
    return Protection(name, tuple(sorted(options.items())))


_EXAMPLES = {"layers": "last", "budget": "10%", "map": "RESULTS", "per": "channel"}


def _fraction(text: str, name: str) -> float:
    """A budget such as '10%' or '0.1' as a fraction in (0, 1]."""
    t = text.strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise ConfigError(f"{name}:budget must be a percentage such as 10%, got {text!r}") from None
    if not 0 < value <= 1:
        raise ConfigError(f"{name}:budget must be in (0, 100%], got {text!r}")
    return value


def _site_error(name: str, site: str, kind: Kind) -> str:
    hint = f"use --site {kind.sites[0]}"
    if name in ("ecc", "parity"):
        why = "it protects stored weights"
    elif name in ("dup", "tmr"):
        why = "it repeats computation, and every copy reads the same stored weights"
        hint = f"use ecc to protect weights, or --site {kind.sites[0]}"
    else:
        why = "it guards " + " and ".join(kind.sites)
    return f"{name} cannot guard a campaign on the {site} site: {why}; {hint}"


def label(spec: str | None) -> str:
    """A specification as tables and plots show it: 'none' for none, and a map= folder by
    its last name (the full path stays in the plan and in --json)."""
    if not spec:
        return "none"
    parts = []
    for item in str(spec).split(","):
        name, *opts = item.split(":")
        opts = [f"map=…/{o[4:].rstrip('/').rsplit('/', 1)[-1]}" if o.startswith("map=") and "/"
                in o[4:].rstrip("/") else o for o in opts]
        parts.append(":".join([name, *opts]))
    return ",".join(parts)
