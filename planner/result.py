"""What an analysis reports: `Analysis` for a whole text, `Stmt` for one of its statements
before the statements are merged, and RANK, which decides a text's kind (that of its most
consequential statement, see plan.Kind).

A reason against caching is written once, by the first rule that finds one (`no_cache`): the
reason a plan shows is the first found, in the order planner.analyze checks them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .plan import Flag, Kind

# A text's kind is that of its most consequential statement (see Kind).
RANK = {Kind.READ: 0, Kind.UTILITY: 1, Kind.TXN: 2, Kind.SESSION: 3, Kind.WRITE: 4, Kind.DDL: 5,
        Kind.UNKNOWN: 6}


@dataclass(slots=True)
class Analysis:
    kind: Kind = Kind.UNKNOWN
    tables_read: set[str] = field(default_factory=set)  # "schema.name" (bare name if unresolved)
    tables_written: set[str] = field(default_factory=set)
    functions: set[str] = field(default_factory=set)  # "schema.name" when resolvable, else "name"
    flags: set[Flag] = field(default_factory=set)
    why_not: str = ""  # the first reason it is not cacheable ("" = cacheable)
    parsed: bool = True  # False: some statement was only classified by its keywords
    statements: int = 0
    kinds: list[Kind] = field(default_factory=list)  # per statement

    @property
    def cacheable(self) -> bool:
        return not self.why_not

    def no_cache(self, why: str) -> None:
        if not self.why_not:
            self.why_not = why


@dataclass(slots=True)
class Stmt:
    """One statement's analysis before it is merged into the text's."""

    kind: Kind
    head: str = ""
    reads: set[str] = field(default_factory=set)
    writes: set[str] = field(default_factory=set)
    functions: set[str] = field(default_factory=set)
    flags: set[Flag] = field(default_factory=set)
    why: str = ""  # the first detail reason against caching (relations, functions, literals)
    parsed: bool = True
    plain_query: bool = False  # a SELECT / VALUES / TABLE / WITH query with a trusted tree
    note: str = ""  # a statement-level reason against caching (SHOW, EXPLAIN, COPY, ...)

    def no_cache(self, why: str) -> None:
        if not self.why:
            self.why = why
