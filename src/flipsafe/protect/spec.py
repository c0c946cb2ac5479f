"""Protection specifications: the string a user writes, parsed into typed items.

A specification is a comma-separated list of protections, each a name followed by
`:key=value` options, e.g. ``ranger,abft:layers=last,ecc`` or
``dup:budget=10%:map=results/base``. `parse` validates it and returns `Protection`
items; `str()` of the tuple joined by commas (`canonical`) is what plans store and
fingerprint, so two spellings of one specification give one plan. What each protection is
(its sites and options) is its class's in flipsafe.protect.registry.
"""

from __future__ import annotations

from dataclasses import dataclass

from flipsafe.errors import ConfigError
from flipsafe.protect.registry import get, registered

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


def parse(spec, site: str | None = None) -> tuple[Protection, ...]:
    """The protections of `spec` (() for None, '' or 'none'; parsed items pass as they
    are, checked again), checked against `site` when given; ConfigError with one line for
    anything wrong."""
    if spec is None:
        return ()
    if isinstance(spec, (tuple, list)) and all(isinstance(p, Protection) for p in spec):
        spec = ",".join(str(p) for p in spec)
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
    by_name = registered()
    groups: dict[str, str] = {}
    for name, kind in by_name.items():
        if name in items and kind.group is not None:
            if kind.group in groups:
                raise ConfigError(f"protect cannot take both {groups[kind.group]} and {name}; "
                                  "choose one")
            groups[kind.group] = name
    if site is not None:
        for item in items.values():
            kind = by_name[item.name]
            if site not in kind.sites:
                raise ConfigError(kind.site_error(site))
    return tuple(items[n] for n in by_name if n in items)


def canonical(spec, site: str | None = None) -> str | None:
    """The one spelling of `spec` that plans store (None when it protects nothing)."""
    items = parse(spec, site)
    return ",".join(str(p) for p in items) or None


def _item(part: str) -> Protection:
    name, *opts = part.split(":")
    name = name.strip().lower()
    kind = get(name)
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
