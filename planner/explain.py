"""`pgsluice explain "SQL"`: what the planner makes of a query, for humans."""

from __future__ import annotations

from .plan import Plan


def describe(plan: Plan) -> str:
    def names(values: frozenset[str] | frozenset[object]) -> str:
        return ", ".join(sorted(str(v) for v in values)) or "-"

    verdict = plan.verdict
    lines = [
        f"fingerprint: {plan.fingerprint or '-'}",
        f"canonical:   {plan.canonical or '(not parsed: passed through unchanged)'}",
        f"params:      {', '.join(plan.params) or '-'}",
        f"kind:        {plan.kind.value}"
        + (f" ({plan.statements} statements)" if plan.statements > 1 else ""),
        f"reads:       {names(plan.tables_read)}",
        f"writes:      {names(plan.tables_written)}",
        f"functions:   {names(plan.functions)}",
        f"flags:       {names(frozenset(f.value for f in plan.flags))}",
        f"cacheable:   {'yes' if plan.cacheable else 'no (' + plan.why_not + ')'}",
        "batchable:   " + (f"yes (key {plan.batch.table}.{plan.batch.column})" if plan.batch is not None
                             else f"no ({plan.why_not_batch or 'not cacheable'})"),
        f"rewrites:    {'; '.join(plan.rewrites) or '-'}",
        "verdict:     " + ("allow" if verdict.allowed else
                           f"reject {verdict.sqlstate} [{verdict.rule}] {verdict.message}"),
    ]
    if plan.hints:
        lines.append("hints:       " + ", ".join(f"{k}={v}" for k, v in plan.hints))
    if plan.rewrites:
        lines.append("runs as:     " + plan.sql.replace("\n", " "))
    return "\n".join(lines) + "\n"
