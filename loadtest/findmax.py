"""Capacity search: the largest number of agents a target sustains at R queries/s each.

Doubling from `start` until a step fails (p99 above the SLO, or errors and unsent queries
above `max_error_rate` of those scheduled), then bisecting between the last step that passed
and the first that failed, to `resolution` of the answer. Every step is a full open-loop run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from .agents import Plan


@dataclass(frozen=True)
class Slo:
    p99_ms: float = 50.0
    max_error_rate: float = 0.001

    def passed(self, out: dict[str, Any]) -> bool:
        p99 = out["latency_ms"].get("p99")
        return p99 is not None and p99 <= self.p99_ms and out["error_rate"] <= self.max_error_rate


Runner = Callable[[Plan], Awaitable[dict[str, Any]]]


async def find_max(plan: Plan, runner: Runner, slo: Slo, start: int = 1, limit: int = 4096,
                   resolution: float = 0.1, settle: float = 1.0,
                   on_step: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Ramp `plan.agents` with `runner` (a run that also fills `upstream_qps` when it can).
    `best_run` is the runner's whole output at the largest step that held the SLO (or the
    first step when none did)."""
    steps: list[dict[str, Any]] = []
    outputs: dict[int, dict[str, Any]] = {}

    async def step(agents: int) -> bool:
        out = outputs[agents] = await runner(replace(plan, agents=agents))
        passed = slo.passed(out)
        lat = out["latency_ms"]
        row = {"agents": agents, "p50_ms": lat.get("p50"), "p99_ms": lat.get("p99"),
               "error_rate": out["error_rate"], "offered_qps": out["offered_qps"],
               "achieved_qps": out["achieved_qps"], "upstream_qps": out.get("upstream_qps"),
               "generator_cpu_fraction": out["generator_cpu_fraction"], "passed": passed}
        steps.append(row)
        if on_step is not None:
            on_step(row)
        await asyncio.sleep(settle)  # let the target drain what a failed step left behind
        return passed

    best, worst, n = 0, None, max(1, min(start, limit))
    while True:
        if not await step(n):
            worst = n
            break
        best = n
        if n >= limit:
            break
        n = min(n * 2, limit)  # the limit itself is tried before "limit reached" is said
    while worst is not None and worst - best > max(1, int(best * resolution)):
        mid = (best + worst) // 2
        if await step(mid):
            best = mid
        else:
            worst = mid
    at_best = next((s for s in steps if s["agents"] == best), None)
    first = steps[0]["agents"] if steps else 0
    return {"best_run": outputs.get(best) or outputs.get(first), "max_agents": best,
            "slo_p99_ms": slo.p99_ms, "max_error_rate": slo.max_error_rate,
            "rate_per_agent": plan.rate, "step_duration_s": plan.duration, "limit_reached": worst is None,
            "upstream_qps_at_max": at_best["upstream_qps"] if at_best else None,
            "steps": steps}
