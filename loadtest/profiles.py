"""Workload profiles: TOML files (loadtest/profiles/) a user can copy and edit.

Two shapes:

* a **mix** (the default): `[[query]]` templates with weights and parameter distributions
  (`uniform`, `zipf`, `choice`) for `$1`, `$2`...; each query is an independent weighted draw.
* a **speculate** profile (`kind = "speculate"`), after the agent-first data systems study
  (arXiv 2509.00997): an agent takes a task (a `[[topic]]`), and `attempts` parallel attempts
  walk through the `[[phase]]`s (metadata, statistics, partial and full queries) together,
  so most of their queries are shared; with probability `diverge` an attempt writes its own
  spelling (an alternative in the phase's list) or its own `{value}`. The SQL carries literals,
  as agents write it; `{table}`, `{column}`, `{value}` and any other topic key are substituted.

Either may say which of loadtest/sample.py's schemas it runs on (`schema = "shop"`; default
"sample"): the benchmark scripts load that one, and a user points `pgsluice load` at a
database that has it.
"""

from __future__ import annotations

import bisect
import random
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .sample import SCHEMAS

PROFILES = Path(__file__).resolve().parent / "profiles"
Draw = tuple[str, list[Any]]


class ProfileError(ValueError):
    pass


@dataclass(frozen=True)
class Param:
    dist: str
    low: int = 1
    high: int = 1
    s: float = 1.1
    values: tuple[str, ...] = ()

    def draw(self, rng: random.Random, zipf: list[float] | None) -> Any:
        if self.dist == "uniform":
            return rng.randint(self.low, self.high)
        if self.dist == "choice":
            return rng.choice(self.values)
        assert zipf is not None  # zipf: a precomputed cumulative distribution over low..high
        return self.low + bisect.bisect_left(zipf, rng.random() * zipf[-1])


@dataclass(frozen=True)
class Template:
    sql: str
    weight: float
    params: tuple[Param, ...] = ()


def _cumulative(weights: list[float]) -> list[float]:
    acc, out = 0.0, []
    for w in weights:
        acc += w
        out.append(acc)
    return out


@dataclass
class Profile:
    """A weighted mix of query templates."""

    name: str
    description: str
    templates: list[Template]
    schema: str = "sample"
    _cum: list[float] = field(default_factory=list)
    _zipf: dict[int, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._cum = _cumulative([t.weight for t in self.templates])
        for t in self.templates:
            for p in t.params:
                if p.dist == "zipf" and id(p) not in self._zipf:
                    self._zipf[id(p)] = _cumulative([1.0 / (k ** p.s) for k in range(1, p.high - p.low + 2)])

    def draw(self, rng: random.Random) -> Draw:
        t = self.templates[bisect.bisect_left(self._cum, rng.random() * self._cum[-1])]
        return t.sql, [p.draw(rng, self._zipf.get(id(p))) for p in t.params]

    def stream(self, rng: random.Random) -> Iterator[Draw]:
        while True:
            yield self.draw(rng)


@dataclass
class SpeculateProfile:
    """Tasks attacked by `attempts` parallel attempts that share most of their sub-queries."""

    name: str
    description: str
    attempts: int
    diverge: float
    phases: list[tuple[str, list[list[str]]]]  # (phase name, queries: [shared spelling, *alternatives])
    topics: list[dict[str, Any]]
    schema: str = "sample"

    def stream(self, rng: random.Random) -> Iterator[Draw]:
        while True:
            topic = rng.choice(self.topics)
            values = topic.get("values") or [""]
            mine = [values[0] if rng.random() >= self.diverge else rng.choice(values)
                    for _ in range(self.attempts)]
            for _phase, queries in self.phases:
                for spellings in queries:  # the attempts run side by side: interleaved
                    for attempt in range(self.attempts):
                        sql = spellings[0] if rng.random() >= self.diverge else rng.choice(spellings)
                        yield _fill(sql, topic, mine[attempt]), []



AnyProfile = Profile | SpeculateProfile


def _fill(sql: str, topic: dict[str, Any], value: Any) -> str:
    fields = {**topic, "value": value}
    for key, text in topic.items():  # a topic's own text (its `full` query) may use {value}
        if isinstance(text, str) and "{" in text:
            fields[key] = text.format_map({**topic, "value": value})
    return sql.format_map(fields)


def load_profile(name_or_path: str) -> AnyProfile:
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES / f"{name_or_path}.toml"
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ProfileError(f"{path}: {exc}") from None
    name, description = str(data.get("name", path.stem)), str(data.get("description", ""))
    schema = data.get("schema", "sample")
    if schema not in SCHEMAS:
        raise ProfileError(f"{path}: unknown schema {schema!r} ({' or '.join(SCHEMAS)})")
    kind = data.get("kind", "mix")
    if kind == "speculate":
        return replace(_speculate(path, name, description, data), schema=schema)
    if kind != "mix":
        raise ProfileError(f"{path}: unknown kind {kind!r} (mix or speculate)")
    templates = [_template(f"{path}: query {i + 1}", q) for i, q in enumerate(data.get("query", []))]
    if not templates:
        raise ProfileError(f"{path}: no [[query]]")
    return Profile(name, description, templates, schema)


def _template(where: str, q: dict[str, Any]) -> Template:
    if not isinstance(q.get("sql"), str) or not q["sql"].strip():
        raise ProfileError(f"{where}: needs sql")
    weight = q.get("weight", 1)
    if not isinstance(weight, int | float) or weight <= 0:
        raise ProfileError(f"{where}: weight must be positive")
    params = []
    for spec in q.get("params", []):
        dist = spec.get("dist")
        if dist in ("uniform", "zipf"):
            low, high = int(spec.get("min", 1)), int(spec.get("max", 0))
            if high < low:
                raise ProfileError(f"{where}: {dist} needs min <= max")
            params.append(Param(dist, low, high, float(spec.get("s", 1.1))))
        elif dist == "choice" and spec.get("values"):
            params.append(Param(dist, values=tuple(str(v) for v in spec["values"])))
        else:
            raise ProfileError(f"{where}: unknown parameter distribution {spec!r}")
    numbers = {int(n) for n in re.findall(r"\$(\d+)", q["sql"])}
    if numbers != set(range(1, len(numbers) + 1)):
        raise ProfileError(f"{where}: placeholders must be $1..$n without gaps, found {sorted(numbers)}")
    if len(numbers) != len(params):
        raise ProfileError(f"{where}: {len(numbers)} placeholders but {len(params)} params")
    return Template(q["sql"], float(weight), tuple(params))


def _speculate(path: Path, name: str, description: str, data: dict[str, Any]) -> SpeculateProfile:
    attempts, diverge = data.get("attempts", 8), data.get("diverge", 0.1)
    if not isinstance(attempts, int) or attempts < 1:
        raise ProfileError(f"{path}: attempts must be a positive integer")
    if not isinstance(diverge, int | float) or not 0 <= diverge <= 1:
        raise ProfileError(f"{path}: diverge must be between 0 and 1")
    topics = data.get("topic", [])
    if not topics or not all(isinstance(t, dict) for t in topics):
        raise ProfileError(f"{path}: needs [[topic]] tables")
    phases = []
    for i, phase in enumerate(data.get("phase", [])):
        where = f"{path}: phase {i + 1}"
        queries = []
        for q in phase.get("queries", []):
            spellings = [q] if isinstance(q, str) else q
            if not spellings or not all(isinstance(s, str) and s.strip() for s in spellings):
                raise ProfileError(f"{where}: a query is a string or a list of alternative spellings")
            for s in spellings:
                for topic in topics:
                    try:
                        _fill(s, topic, "")
                    except (KeyError, IndexError, ValueError) as exc:
                        raise ProfileError(f"{where}: {s!r}: topic {topic} lacks {exc}") from None
            queries.append(spellings)
        if not queries:
            raise ProfileError(f"{where}: no queries")
        phases.append((str(phase.get("name", f"phase {i + 1}")), queries))
    if not phases:
        raise ProfileError(f"{path}: no [[phase]]")
    return SpeculateProfile(name, description, attempts, float(diverge), phases, topics)
