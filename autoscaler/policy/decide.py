"""The decision core: `decide(pool, observation, state, now) -> Decision`. Pure; the clock is passed in.

One decision, in order::

    paused? ── yes ─> hold
    current unknown? ── yes ─> hold (nothing to act on)
    metric unavailable? ── yes ─> hold (or to the nearest bound when outside min..max), or the fixed
                                  fallback count after N failed ticks
    current outside min..max? ── yes ─> straight to the nearest bound
    strategy -> recommendation (clamped to min..max), appended to the history
    current below the count this controller set, and more wanted (at the current count, or at the one set:
    in a hold band either holds itself)? ── yes ─> restore it now (a repair)
      above current: sustained (lowest recommendation over `sustain`) -> up-cooldown -> step limit
      below current: stabilized (highest recommendation over `stabilization`) -> scale-in paused?
                     -> down-cooldown -> step limit
      equal: hold
    last, any scale-up: replicas still draining count toward max; past max (+ surge) ─> capped (hold, or less)
    a scale-up (a repair too) while new replicas keep failing at start? ── yes ─> hold, saying until when
    warm standbys (policy/standby.py): how many of the change are activations or returns, and how many
    standbys to boot or retire

Cooldowns: within `cooldown.up` of the previous scale-up, a scale-up waits only when a scale-down came in
between or when it would reach no higher than that scale-up did: a higher reading during the same burst acts
at once (bounded by the step limit), and a scale-up during a scale-down cooldown acts at once. A scale-down
waits `cooldown.down` after any action, so a pool that just grew is not shrunk straight away.
"""

from __future__ import annotations

import math
from dataclasses import replace

from autoscaler.policy.backoff import backing_off
from autoscaler.policy.model import Metric, PoolPolicy, format_duration
from autoscaler.policy.standby import plan_standby
from autoscaler.policy.strategies import recommend
from autoscaler.types import Decision, Direction, Observation, PoolState

__all__ = ["decide", "metric_value", "prune_history", "window_values"]


def decide(pool: PoolPolicy, observation: Observation, state: PoolState, now: float) -> Decision:
    """Decide how many replicas `pool` should run; the returned state is what to remember next tick.

    The state does not record the action itself: the caller does that with `PoolState.after_action`
    once the backend has actually scaled, so a failed or dry-run action starts no cooldown.
    """
    decision = _backed_off(_capped(pool, observation.draining, _decide(pool, observation, state, now)), now)
    return plan_standby(pool, observation, decision, now)


def _capped(pool: PoolPolicy, draining: int, decision: Decision) -> Decision:
    """A scale-up limited so that the replicas being stopped, which still run, keep the pool within `max`
    (+ `surge`, allowed only while they drain): a hold, or a smaller scale-up, that says so."""
    current, desired = decision.current, decision.desired
    if draining <= 0 or current is None or desired is None or desired <= current:
        return decision
    surge = f" + surge {pool.surge}" if pool.surge else ""
    room = pool.max + pool.surge - draining
    if desired > room:
        capped = max(current, room)
        why = f"{decision.reason}; {draining} draining count toward max {pool.max}{surge}"
        if capped == current:
            # Not done, so not remembered as a repair: the count comes back once the victims are gone.
            details = {k: v for k, v in decision.details.items() if k != "repair"}
            return replace(decision, desired=current, reason=f"{why}: holding at {current}", details=details)
        return replace(decision, desired=capped, reason=f"{why}: scaling to {capped}")
    if desired + draining > pool.max:
        return replace(decision, reason=(
            f"{decision.reason}; surge {pool.surge}: {desired + draining - pool.max} above max {pool.max} while "
            f"{draining} drain"
        ))
    return decision


def _backed_off(decision: Decision, now: float) -> Decision:
    """A scale-up held while the pool's new replicas keep failing at start (the back-off in its state)."""
    blocked = backing_off(decision.state.backoff, now) if decision.direction is Direction.UP else None
    if blocked is None:
        return decision
    # Whatever asks for more (min, a repair, the fallback), replicas that fail at start would only churn.
    return replace(
        decision, desired=decision.current, reason=f"{decision.reason}; {blocked}",
        details={k: v for k, v in decision.details.items() if k != "repair"},
    )


def _decide(pool: PoolPolicy, observation: Observation, state: PoolState, now: float) -> Decision:
    current = observation.current
    # A clock that went back (a new leader on another host) or a poisoned record must not freeze cooldowns.
    state = state.clamped(now)
    history = prune_history(state.recommendations, now, _longest_window(pool))
    state = replace(state, recommendations=history)

    def hold(reason: str, new_state: PoolState = state, **extra: object) -> Decision:
        return Decision(pool.name, current, current, reason, new_state, **extra)  # type: ignore[arg-type]

    if not pool.enabled:
        # Whatever the operator does to a paused pool is theirs: nothing to restore when it is resumed.
        return hold("paused (enabled: false)", replace(state, target=None))

    metric, why_unavailable = metric_value(pool, observation)
    if metric is None:
        return _without_metric(pool, current, state, why_unavailable)

    state = replace(state, consecutive_failures=0)
    if current is None:
        return hold(f"current replicas unknown ({observation.backend_error or 'no answer'}): holding", metric=metric)

    raw, explanation = recommend(pool, metric, current)
    recommendation = min(max(raw, pool.min), pool.max)
    if recommendation != raw:
        explanation += f" (kept within min..max {pool.min}..{pool.max})"
    if not history or history[-1][1] != recommendation:
        # Only changes are kept: a recommendation stands until the next one, which is all the windows
        # need, and the state stays a few entries long instead of one per tick.
        history = (*history, (now, recommendation))
    state = replace(state, recommendations=history)

    def result(desired: int, reason: str, **details: object) -> Decision:
        return Decision(
            pool.name, current, desired, reason, state, metric=metric, recommendation=recommendation, details=details
        )

    if current < pool.min:
        return result(pool.min, f"{current} is below min {pool.min}")
    if current > pool.max:
        return result(pool.max, f"{current} is above max {pool.max}")
    if state.target is not None and current < state.target:
        restored = _restore(pool, state, metric, now=now, current=current, recommendation=recommendation,
                            explanation=explanation)
        if restored is not None:
            desired, reason, repair = restored
            return result(desired, reason, **({"repair": True} if repair else {}))
        state = replace(state, target=current)  # the lower count is what is wanted now too: nothing to restore
    if recommendation > current:
        return result(*_scale_up(pool, state, now=now, current=current, explanation=explanation))
    if recommendation < current:
        return result(
            *_scale_down(pool, state, now=now, current=current, recommendation=recommendation, explanation=explanation)
        )
    return result(current, explanation)


def _restore(
    pool: PoolPolicy, state: PoolState, metric: float, *, now: float, current: int, recommendation: int,
    explanation: str,
) -> tuple[int, str, bool] | None:
    """A count below the one this controller set: (desired, reason, is it a repair), or None when the lower
    count is all that is wanted.

    Cooldowns, sustain and step limits pace changes of the recommendation; this count was lowered by someone
    else (or replicas exited, or were replaced), and capacity that ran moments ago is restored at once, up to
    what is wanted. What is wanted is asked at the count this controller set as well as at the lowered one:
    inside a hold band (tiers) or a tolerance band (per_replica) the strategy keeps whatever count it is
    given, so asked at the lowered count alone it would keep that count for good. Beyond the old count, the
    scale-up is an ordinary, paced one.
    """
    assert state.target is not None
    at_target = min(max(recommend(pool, metric, state.target)[0], pool.min), pool.max)
    restore = min(state.target, max(recommendation, at_target))
    if restore <= current:
        return None
    if recommendation > state.target:
        up, up_reason = _scale_up(pool, state, now=now, current=current, explanation=explanation)
        if up > restore:
            return up, up_reason, False
    return restore, (
        f"{explanation}; {current} running, below the {state.target} this controller set (lowered from "
        f"outside, or replicas exited): restoring {restore} now"
    ), True


def _without_metric(pool: PoolPolicy, current: int | None, state: PoolState, why: str) -> Decision:
    failures = state.consecutive_failures + 1
    failed = replace(state, consecutive_failures=failures)
    fallback = pool.on_metric_failure
    if current is not None and fallback.action == "fixed" and failures >= fallback.after:
        assert fallback.replicas is not None  # validated by the model
        return Decision(
            pool.name, current, fallback.replicas,
            f"metric unavailable for {failures} ticks ({why}): fallback to {fallback.replicas}", failed,
        )
    if current is not None and not pool.min <= current <= pool.max:
        # The bounds need no metric: a pool outside them is brought back whatever the queues say.
        bound = min(max(current, pool.min), pool.max)
        where = f"below min {pool.min}" if current < pool.min else f"above max {pool.max}"
        return Decision(pool.name, current, bound, f"{current} is {where} (metric unavailable)", failed)
    return Decision(pool.name, current, current, f"metric unavailable ({why}): holding", failed)


def _scale_up(pool: PoolPolicy, state: PoolState, *, now: float, current: int, explanation: str) -> tuple[int, str]:
    sustained = min(window_values(state.recommendations, now, pool.sustain, current))
    if sustained <= current:
        return current, f"{explanation}; not yet sustained for {format_duration(pool.sustain)}"
    desired = sustained if pool.max_step.up is None else min(sustained, current + pool.max_step.up)
    step = f" (step limit {pool.max_step.up})" if desired < sustained else ""
    held = _up_cooldown(pool, state, now=now, desired=desired)
    if held is not None:
        return current, f"{explanation}; {held}"
    return desired, f"{explanation}{step}"


def _up_cooldown(pool: PoolPolicy, state: PoolState, *, now: float, desired: int) -> str | None:
    """Why the up-cooldown holds a scale-up to `desired`, or None when it does not.

    Within `cooldown.up` of the last scale-up it holds only a scale-up that would flap (a scale-down came in
    between) or that reaches no further than that scale-up did (`last_scale_up_to`; unknown in a state
    written before it was kept: held, as before). A higher reading during the same burst acts at once,
    bounded by the step limit: a tick that caught the burst half-published must not hold the rest back.
    """
    last = state.last_scale_up
    if last is None or now - last >= pool.cooldown.up:
        return None
    left = f"{format_duration(round(pool.cooldown.up - (now - last), 1))} left"
    if state.last_scale_down is not None and state.last_scale_down >= last:
        return f"up-cooldown after a scale-down, {left}"
    if state.last_scale_up_to is None or desired <= state.last_scale_up_to:
        reached = "" if state.last_scale_up_to is None else f" (the last scale-up reached {state.last_scale_up_to})"
        return f"up-cooldown{reached}, {left}"
    return None


def _scale_down(
    pool: PoolPolicy, state: PoolState, *, now: float, current: int, recommendation: int, explanation: str
) -> tuple[int, str]:
    stabilized = max(window_values(state.recommendations, now, pool.stabilization, current))
    if stabilized >= current:
        return current, (
            f"{explanation}; stabilization: highest recommendation in the last "
            f"{format_duration(pool.stabilization)} is {stabilized}"
        )
    if not pool.scale_in:
        return current, f"{explanation}; scale-in paused (scale_in: false)"
    actions = [t for t in (state.last_scale_up, state.last_scale_down) if t is not None]
    if actions and now - max(actions) < pool.cooldown.down:
        left = pool.cooldown.down - (now - max(actions))
        return current, f"{explanation}; down-cooldown, {format_duration(round(left, 1))} left"
    desired = stabilized if pool.max_step.down is None else max(stabilized, current - pool.max_step.down)
    step = f" (step limit {pool.max_step.down})" if desired > stabilized else ""
    stable = f" (stabilized at {stabilized})" if stabilized != recommendation else ""
    return desired, f"{explanation}{stable}{step}"


def metric_value(pool: PoolPolicy, observation: Observation) -> tuple[float | None, str]:
    """The number the pool's strategy looks at, or (None, why) when it cannot be known."""
    if observation.metric_error is not None:
        return None, observation.metric_error
    wanted = set(pool.queues)
    stats = [q for q in observation.queues if q.name in wanted]
    missing = wanted - {q.name for q in stats}
    if missing:
        return None, f"no reading for queue(s) {', '.join(sorted(missing))}"
    # A queue the source could not read (a key of the wrong type) holds only the pools that use it.
    unreadable = [q.error for q in stats if q.error is not None]
    if unreadable:
        return None, "; ".join(unreadable)
    if pool.metric is Metric.WAITING:
        return _finite(float(sum(q.waiting for q in stats)), "waiting")
    if pool.metric is Metric.WAITING_UNACKED:
        no_unacked = [q.unacked_error for q in stats if q.unacked_error is not None]
        if no_unacked:
            return None, f"unacked unknown ({no_unacked[0]})"
        return _finite(float(sum(q.waiting + q.unacked for q in stats)), "waiting + unacked")
    unknown = [q for q in stats if q.latency_s is None]
    if unknown:
        if all(q.latency_error is None for q in unknown):
            names = ", ".join(q.name for q in unknown)
            return None, f"latency unknown for {names} (messages carry no publish-time stamp)"
        return None, "; ".join(
            f"latency unknown for {q.name} ({q.latency_error or 'messages carry no publish-time stamp'})"
            for q in unknown
        )
    return _finite(max((q.latency_s or 0.0) for q in stats), "latency")


def _finite(value: float, what: str) -> tuple[float | None, str]:
    # An infinite or NaN reading (e.g. a publish stamp of -1e400) is unknown, never a number to act on.
    if not math.isfinite(value) or value < 0:
        return None, f"{what} reading {value} is not a finite, non-negative number"
    return value, ""


def window_values(history: tuple[tuple[float, int], ...], now: float, window: float, current: int) -> list[int]:
    """Recommendations that apply within `window` seconds before `now`.

    The newest one older than the window counts too (it was still in force when the window opened).
    When the history does not reach back that far, the current count stands in for the missing part:
    an upward move then needs `sustain` of evidence, and a fresh controller does not shrink a pool on
    its first tick.
    """
    if window <= 0:
        return [history[-1][1]] if history else [current]
    start = now - window
    inside = [n for t, n in history if t > start]
    before = [n for t, n in history if t <= start]
    return [*(before[-1:] if before else [current]), *inside]


def prune_history(history: tuple[tuple[float, int], ...], now: float, keep: float) -> tuple[tuple[float, int], ...]:
    """Drop recommendations no window needs, keeping the newest one older than `keep` (see window_values)."""
    start = now - keep
    older = [i for i, (t, _) in enumerate(history) if t <= start]
    first = older[-1] if older else 0
    return tuple(history[first:])


def _longest_window(pool: PoolPolicy) -> float:
    return max(pool.sustain, pool.stabilization)
