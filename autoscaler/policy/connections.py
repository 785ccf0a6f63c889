"""The PostgreSQL connection budget: the worst case the policy allows, as one sum (the seed's connection case).

Each pool process (a prefork child) or pool thread holds at most one connection per database alias while
it runs tasks (Django keeps one per thread); a worker's main process holds none. So the worst case is, per
pool, the policy's `max` replicas x the worker concurrency x connections per process, summed over the pools,
plus what the web tier and one-off commands hold. The doctor compares it with `max_connections`; budget
checks at policy level reuse the same function.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ConnectionBudget", "PoolConnections", "worst_case_connections"]


@dataclass(frozen=True, slots=True)
class PoolConnections:
    """One pool's share: `max_replicas` x `concurrency` processes or threads x `per_process` connections."""

    name: str
    max_replicas: int
    concurrency: int
    per_process: int = 1

    @property
    def connections(self) -> int:
        return max(0, self.max_replicas) * max(0, self.concurrency) * max(0, self.per_process)


@dataclass(frozen=True, slots=True)
class ConnectionBudget:
    pools: tuple[PoolConnections, ...]
    web: int
    total: int

    def explain(self) -> str:
        """`fast 10x8x1=80 + io 10x20x1=200 + web 16 = 296`."""
        terms = [f"{p.name} {p.max_replicas}x{p.concurrency}x{p.per_process}={p.connections}" for p in self.pools]
        if self.web:
            terms.append(f"web {self.web}")
        return f"{' + '.join(terms) or '0'} = {self.total}"


def worst_case_connections(pools: Sequence[PoolConnections], *, web: int = 0) -> ConnectionBudget:
    """Sum over `pools` of max x concurrency x connections per process, plus `web` (negatives count as 0)."""
    web = max(0, web)
    return ConnectionBudget(pools=tuple(pools), web=web, total=sum(p.connections for p in pools) + web)
