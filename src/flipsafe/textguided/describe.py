"""Class descriptions from prompt templates, description files, bundled sets or an LLM."""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path

import yaml

from flipsafe import atomic
from flipsafe.data.digits import DIGIT_NAMES
from flipsafe.errors import ConfigError, DataError, unknown

BUNDLED_SETS = ("digits", "cifar10", "cifar100")

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a low resolution photo of a {}.",
    "a close-up photo of a {}.",
    "a cropped photo of the {}.",
    "a bright photo of a {}.",
    "a drawing of a {}.",
)

DEFAULT_QUESTIONS = (
    "Describe what a {} looks like in a photo.",
    "What visual features identify a {}?",
    "How can you recognise a {} in an image?",
    "Describe the typical shape, colour and texture of a {}.",
    "What does a {} look like up close?",
    "Describe a picture of a {}.",
)

SYSTEM_PROMPT = (
    "You describe the visual appearance of things for an image classifier. "
    "Answer in one or two plain sentences, without lists or headings."
)

_CACHE_FORMAT = "flipsafe.llm_cache/1"


class Descriptions(dict):
    """A `{class: [description, ...]}` dict that remembers where its texts came from."""

    def __init__(self, data=(), source: str | None = None):
        super().__init__(data)
        self.source = source


def canonical_class(name) -> str:
    """The key class names are matched by: case, spaces, '-' and '_' ignored; '3' = 'three'."""
    key = "_".join(str(name).strip().lower().replace("-", " ").replace("_", " ").split())
    if len(key) == 1 and key.isdigit():
        return DIGIT_NAMES[int(key)]
    # torchvision's MNIST names its classes like "3 - three".
    m = re.fullmatch(r"(\d)_([a-z]+)", key)
    if m and DIGIT_NAMES[int(m.group(1))] == m.group(2):
        return m.group(2)
    return key


def class_phrase(name: str) -> str:
    """How a class name reads inside a sentence: 'aquarium_fish' -> 'aquarium fish'."""
    return " ".join(str(name).replace("_", " ").split())


def validated_descriptions(data, where: str) -> dict[str, list[str]]:
    if not isinstance(data, Mapping):
        raise DataError(
            f"{where}: expected a mapping {{class: [descriptions...]}}, got {type(data).__name__}"
        )
    out: dict[str, list[str]] = {}
    for key, texts in data.items():
        # YAML reads a bare 3: as an int; treat it as the class named "3".
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise DataError(f"{where}: class names must be strings, got {key!r}")
        name = str(key)
        if not isinstance(texts, list):
            raise DataError(
                f"{where}: class {name!r} must map to a list of description strings, "
                f"got {type(texts).__name__}"
            )
        if not texts:
            raise DataError(f"{where}: class {name!r} has an empty description list; add at least one")
        clean = []
        for text in texts:
            if not isinstance(text, str):
                raise DataError(
                    f"{where}: class {name!r} has a non-string description {text!r}; "
                    "descriptions must be strings"
                )
            if not text.strip():
                raise DataError(f"{where}: class {name!r} has a blank description; remove it")
            clean.append(text.strip())
        out[name] = clean
    if not out:
        raise DataError(f"{where}: no classes found")
    return out


def _select(data: dict[str, list[str]], classes, source: str, where: str) -> Descriptions:
    """The descriptions of `classes` (in that order, under those names), or all of `data`."""
    if classes is None:
        return Descriptions(data, source)
    index: dict[str, str] = {}
    for key in data:
        canon = canonical_class(key)
        if canon in index:
            raise DataError(f"{where}: classes {index[canon]!r} and {key!r} are the same class")
        index[canon] = key
    classes = [str(c) for c in classes]
    seen: set[str] = set()
    for c in classes:
        if canonical_class(c) in seen:
            raise ConfigError(f"class {c!r} is requested twice; class names must be distinct")
        seen.add(canonical_class(c))
    missing = [c for c in classes if canonical_class(c) not in index]
    if missing:
        raise DataError(
            f"{where}: no descriptions for class(es) {', '.join(map(repr, missing))}; "
            f"add them (it has: {', '.join(data)})"
        )
    return Descriptions({c: list(data[index[canonical_class(c)]]) for c in classes}, source)


def bundled_descriptions(name: str, classes: Iterable[str] | None = None) -> Descriptions:
    """The hand-written description set `name` (digits, cifar10, cifar100).

    With `classes`, returns exactly those classes in that order, matched with
    `canonical_class` (so 'Cat', '3' or 'aquarium fish' are found).
    """
    if name not in BUNDLED_SETS:
        raise unknown("description set", name, BUNDLED_SETS)
    text = resources.files("flipsafe.textguided").joinpath(f"descriptions/{name}.json").read_text(
        encoding="utf-8"
    )
    where = f"bundled description set {name!r}"
    return _select(validated_descriptions(json.loads(text), where), classes, f"bundled:{name}", where)


def template_descriptions(classes: Iterable[str], templates: Iterable[str] | None = None) -> Descriptions:
    """One description per template and class, e.g. 'a photo of a cat.'"""
    templates = list(DEFAULT_TEMPLATES if templates is None else templates)
    if not templates:
        raise ConfigError("no prompt templates given; pass at least one, like 'a photo of a {}.'")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ConfigError(f"prompt template {t!r} must contain '{{}}' exactly once for the class name")
    classes = [str(c) for c in classes]
    if not classes:
        raise ConfigError("no classes given to describe")
    return Descriptions(
        {c: [t.replace("{}", class_phrase(c)) for t in templates] for c in classes}, "template"
    )


def load_descriptions(path, classes: Iterable[str] | None = None) -> Descriptions:
    """Read `{class: [descriptions...]}` from a JSON or YAML file and check it.

    With `classes`, every class must be present (matched with `canonical_class`)
    and the result holds exactly those classes in that order.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"description file {str(path)!r} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"description file {str(path)!r} is not UTF-8 text (byte {exc.object[exc.start]:#04x} "
            f"at offset {exc.start}); save it as UTF-8"
        ) from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise DataError(
            f"description file {str(path)!r} is not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}"
        ) from None
    where = f"description file {str(path)!r}"
    return _select(validated_descriptions(data, where), classes, f"file:{path}", where)


def save_descriptions(descriptions: Mapping[str, list[str]], path) -> Path:
    """Write descriptions as JSON (or YAML for a .yaml/.yml path); returns the path."""
    path = Path(path)
    data = validated_descriptions(descriptions, "descriptions to save")
    if path.suffix.lower() in (".yaml", ".yml"):
        text = yaml.safe_dump(data, allow_unicode=True, sort_keys=False, width=100)
    else:
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    atomic.write_text(path, text)
    return path


def _read_cache(path: Path) -> dict:
    if not path.exists():
        return {"format": _CACHE_FORMAT, "answers": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(
            f"LLM answer cache {str(path)!r} cannot be read ({exc}); fix it or pass another cache path"
        ) from None
    if (
        not isinstance(data, dict)
        or data.get("format") != _CACHE_FORMAT
        or not isinstance(data.get("answers"), dict)
    ):
        raise DataError(
            f"{str(path)!r} is not a flipsafe LLM answer cache; pass another cache path"
        )
    return data


def _ask(base_url: str, model: str, api_key: str | None, question: str, timeout: float) -> str:
    url = base_url.rstrip("/") + "/chat/completions"
    body = json.dumps(
        {
            "model": model,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": question},
            ],
        }
    ).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:300].decode("utf-8", "replace")
        raise ConfigError(
            f"LLM endpoint {url} answered HTTP {exc.code}: {detail}; "
            "check the base URL, model name and API key"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(
            f"cannot reach LLM endpoint {url} ({reason}); check the base URL "
            "(FLIPSAFE_LLM_BASE_URL) or use cached answers"
        ) from None
    try:
        answer = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise DataError(
            f"LLM endpoint {url} did not answer in the OpenAI chat format: "
            f"{raw[:200].decode('utf-8', 'replace')!r}"
        ) from None
    if not isinstance(answer, str) or not answer.strip():
        raise DataError(f"LLM endpoint {url} gave an empty answer to {question!r}")
    return " ".join(answer.split())


def llm_descriptions(
    classes: Iterable[str],
    base_url: str | None = None,
    model: str | None = None,
    api_key: str | None = None,
    questions: Iterable[str] | None = None,
    cache=None,
    timeout: float = 60.0,
) -> Descriptions:
    """Ask an OpenAI-compatible chat endpoint each question about each class.

    Unset arguments come from FLIPSAFE_LLM_BASE_URL, FLIPSAFE_LLM_MODEL and
    OPENAI_API_KEY. Answers are cached in the JSON file `cache` under
    (model, class, question); answers found there are not asked again, so a
    repeated run needs no endpoint.
    """
    base_url = base_url or os.environ.get("FLIPSAFE_LLM_BASE_URL")
    model = model or os.environ.get("FLIPSAFE_LLM_MODEL")
    api_key = api_key or os.environ.get("OPENAI_API_KEY")
    if not model:
        raise ConfigError("no LLM model named; pass model= or set FLIPSAFE_LLM_MODEL")
    questions = list(DEFAULT_QUESTIONS if questions is None else questions)
    if not questions:
        raise ConfigError("no questions given; pass at least one, like 'Describe a {}.'")
    for q in questions:
        if not isinstance(q, str) or q.count("{}") != 1:
            raise ConfigError(f"question {q!r} must contain '{{}}' exactly once for the class name")
    classes = [str(c) for c in classes]
    if not classes:
        raise ConfigError("no classes given to describe")

    cache_path = Path(cache) if cache is not None else None
    store = _read_cache(cache_path) if cache_path else {"format": _CACHE_FORMAT, "answers": {}}
    out = Descriptions(source=f"llm:{model}")
    for c in classes:
        answers = store["answers"].setdefault(model, {}).setdefault(c, {})
        texts = []
        for q in questions:
            question = q.replace("{}", class_phrase(c))
            if question not in answers:
                if not base_url:
                    raise ConfigError(
                        f"no cached answer to {question!r} and no LLM endpoint; pass base_url= "
                        "or set FLIPSAFE_LLM_BASE_URL (e.g. https://api.openai.com/v1)"
                    )
                answers[question] = _ask(base_url, model, api_key, question, timeout)
                # Saved after every answer so an interrupted run keeps what it paid for.
                if cache_path:
                    atomic.write_text(cache_path, json.dumps(store, indent=2, ensure_ascii=False) + "\n")
            texts.append(answers[question])
        out[c] = texts
    return out
