"""Retry policy of a state and the decision it takes for one failed attempt."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class RetryDecision:
    retry: bool
    delay: float = 0.0


@dataclass(frozen=True)
class Retry:
    """Per-state retry policy.

    ``max_attempts`` counts every attempt, the first included, and also bounds how
    often the reaper hands a crashed attempt to another worker. The n-th retry waits
    ``min(max_delay, backoff * 2**(n-1))`` seconds, spread by ``± jitter`` (a fraction).
    Only exceptions of the ``retry_on`` types are retried; exceptions of the
    ``give_up_on`` types (permanent errors, e.g. ``ValueError``) never are, even when
    they are also ``retry_on`` types. The default: 3 attempts, 1 s doubling, 300 s
    cap, 10% jitter, every ``Exception`` retried.
    """

    max_attempts: int = 3
    backoff: float = 1.0
    max_delay: float = 300.0
    jitter: float = 0.1
    retry_on: tuple[type[BaseException], ...] = field(default=(Exception,))
    give_up_on: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("Retry.max_attempts must be at least 1")
        if self.backoff < 0 or self.max_delay < 0:
            raise ValueError("Retry.backoff and Retry.max_delay must not be negative")
        if not 0 <= self.jitter <= 1:
            raise ValueError("Retry.jitter is a fraction between 0 and 1")
        for name in ("retry_on", "give_up_on"):
            types = getattr(self, name)
            if isinstance(types, type):
                types = (types,)
            types = tuple(types)
            if not all(isinstance(t, type) and issubclass(t, BaseException) for t in types):
                raise ValueError(f"Retry.{name} takes exception types")
            object.__setattr__(self, name, types)

    def delay(self, attempt: int, rand: float = 0.5) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based).

        ``rand`` is a number in [0, 1) supplied by the caller, so the policy stays pure.
        """
        base = min(self.max_delay, self.backoff * 2 ** max(0, attempt - 1))
        return max(0.0, base * (1 + self.jitter * (2 * rand - 1)))

    def gives_up_on(self, exc: BaseException) -> bool:
        """Is ``exc`` permanent under this policy (never retried, whatever the attempt)?"""
        return isinstance(exc, self.give_up_on) or not isinstance(exc, self.retry_on)

    def decide(self, attempt: int, exc: BaseException, rand: float = 0.5) -> RetryDecision:
        """Retry attempt ``attempt`` that raised ``exc``?"""
        if attempt >= self.max_attempts or self.gives_up_on(exc):
            return RetryDecision(retry=False)
        return RetryDecision(retry=True, delay=self.delay(attempt, rand))


DEFAULT_RETRY = Retry()
