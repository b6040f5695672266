"""Query planner: understand every query text once.

    planner = Planner(catalog)
    plan = planner.analyze(sql, facts)        # a dict look-up for a text seen before

Three levels, cheapest first: the plan cache (exact text + session facts -> Plan); the
shape cache (a text that differs from a known one only in literal values reuses that
Plan with its own parameters, no parse); sqlglot (parse, canonicalize, analyse).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable

from .analyze import analyze as _analyze
from .batch import Batchable, batchable
from .canonical import Canonical, canonicalize, parse
from .catalog import Catalog
from .guard import check
from .normalize import FastShape, comment_hints, fast_shape
from .plan import ALLOW, Flag, Kind, Plan, SessionFacts, Verdict
from .policy import Policies, Policy
from .reach import Reach, for_read, for_write
from .statements import split

__all__ = ["ALLOW", "Catalog", "Flag", "Kind", "Plan", "Planner", "Policies", "Policy", "SessionFacts",
           "Verdict"]

_Key = tuple[str, SessionFacts]
MAX_PARSE = 16 * 1024  # characters


@dataclasses.dataclass(slots=True)
class PlannerStats:
    hits: int = 0  # exact text seen before
    shape_hits: int = 0  # new text, known shape: no parse
    misses: int = 0  # parsed with sqlglot
    unparsed: int = 0  # sqlglot could not parse: passed through, uncached
    evictions: int = 0


class Planner:
    def __init__(self, catalog: Catalog | None = None, max_plans: int = 10_000,
                 policies: Policies | None = None) -> None:
        self.catalog = catalog or Catalog()
        self.policies = {p.name: p for p in (policies.roles if policies else ())}
        self.max_plans = max_plans
        self.stats = PlannerStats()
        self._plans: OrderedDict[_Key, Plan] = OrderedDict()
        self._shapes: dict[tuple[str, SessionFacts], tuple[Plan, Canonical]] = {}
        # called when plans made so far are dropped: what was decided from them elsewhere (the
        # wire door's fast path) is decided again
        self.on_change: Callable[[], None] = lambda: None

    def set_policies(self, policies: Policies) -> None:
        """New guardrails (RELOAD): plans carry verdicts, so they are made again."""
        self.policies = {p.name: p for p in policies.roles}
        self._plans.clear()
        self._shapes.clear()
        self.on_change()

    def set_catalog(self, catalog: Catalog) -> None:
        """New catalog facts (after DDL): every plan made with the old ones is dropped."""
        self.catalog = catalog
        self._plans.clear()
        self._shapes.clear()
        self.on_change()

    def analyze(self, sql: str, facts: SessionFacts) -> Plan:
        key = (sql, facts)
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
            self.stats.hits += 1
            return plan
        plan = self._miss(sql, facts)
        self._plans[key] = plan
        if len(self._plans) > self.max_plans:
            self._plans.popitem(last=False)
            self.stats.evictions += 1
        return plan

    def _miss(self, sql: str, facts: SessionFacts) -> Plan:
        shape = fast_shape(sql) if len(sql) <= MAX_PARSE else None
        if shape is not None:
            known = self._shapes.get((shape.key, facts))
            if known is not None:
                template, known_canon = known
                params = known_canon.rebind(shape)
                if params is not None:
                    self.stats.shape_hits += 1
                    plan = dataclasses.replace(template, sql=sql, params=params, hints=comment_hints(sql))
                    return self._guard(plan, facts)
        self.stats.misses += 1
        plan, canon = self.build(sql, facts, shape)
        if shape is not None and canon is not None and canon.sources is not None:
            if len(self._shapes) >= self.max_plans:
                self._shapes.clear()
            self._shapes[(shape.key, facts)] = (plan, canon)
        return plan

    def build(self, sql: str, facts: SessionFacts,
              shape: FastShape | None = None) -> tuple[Plan, Canonical | None]:
        """The full analysis, without caches (also what `pgsluice explain` prints)."""
        statements = split(sql)
        # sqlglot costs about 1.5 us per character: a huge text would stall the event loop,
        # so past MAX_PARSE it is judged by its statements' keywords only (never cacheable).
        trees = parse(sql) if len(sql) <= MAX_PARSE else None
        if trees and shape is None:
            shape = fast_shape(sql)
        canon = canonicalize(sql, shape, trees) if trees else None
        result = _analyze(sql, statements, trees, facts, self.catalog)
        if not result.parsed:
            self.stats.unparsed += 1
        cacheable = not result.why_not and canon is not None
        own = shape.max_param if shape is not None else 0
        reach: Reach | None = None
        batch: Batchable | None = None
        why_not_batch = "not cacheable" if not cacheable else "catalog not loaded"
        if canon is not None and self.catalog.loaded:
            if cacheable:
                reach = for_read(canon.sql, own, result.tables_read, facts, self.catalog)
                batch, why_not_batch = batchable(canon.sql, own, result.tables_read, facts, self.catalog)
            elif result.kind is Kind.WRITE:
                reach = for_write(canon.sql, own, facts, self.catalog)
        plan = Plan(
            kind=result.kind, sql=sql,
            fingerprint=canon.fingerprint if canon else "", canonical=canon.sql if canon else "",
            params=canon.params if canon else (),
            tables_read=frozenset(result.tables_read), tables_written=frozenset(result.tables_written),
            functions=frozenset(result.functions), flags=frozenset(result.flags),
            cacheable=cacheable, why_not=result.why_not or ("" if canon else "not understood by the parser"),
            statements=max(1, len(statements)), parsed=result.parsed and canon is not None,
            hints=comment_hints(sql), reach=reach, batch=batch, why_not_batch=why_not_batch,
        )  # fmt: skip
        return self._guard(plan, facts), canon

    def _guard(self, plan: Plan, facts: SessionFacts) -> Plan:
        """Apply the session's role policy: the verdict, and the SQL to run."""
        policy = self.policies.get(facts.role_policy) if facts.role_policy else None
        if policy is None:
            return plan
        verdict, sql, rewrites = check(plan, policy)
        if rewrites and plan.batch is not None:  # a rewritten statement is not the one analysed
            return dataclasses.replace(plan, verdict=verdict, sql=sql, rewrites=rewrites, batch=None,
                                       why_not_batch="rewritten by a guardrail")
        return dataclasses.replace(plan, verdict=verdict, sql=sql, rewrites=rewrites)
