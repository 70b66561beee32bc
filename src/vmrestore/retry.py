"""One retry rule for every reconnect: bounded attempts, capped backoff with jitter, a deadline.

Every data path that can lose a connection and pick up again (the core's
repository source, the TLS batch loop, the disk task driver) counts its
consecutive failures here, so "how many times, how long between, when to
give up, and which errors are worth another try" is decided once.

    backoff = Backoff(RetryPolicy(attempts=5), "disk 0: repository agent")
    while True:
        try:
            step()
            backoff.reset()          # progress: the budget starts again
        except OSError as e:
            backoff.failed(e)        # sleeps, or raises the give-up error
"""

from __future__ import annotations

import errno
import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from vmrestore.errors import AuthenticationError, MoverError, RemoteError, TransportError

log = logging.getLogger("vmrestore.retry")
T = TypeVar("T")

# errno values that name a broken or unreachable peer (worth a reconnect), as opposed to a
# local file that is missing or a permission (retrying changes nothing).
_NETWORK_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE,
                   errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN,
                   errno.EHOSTDOWN, errno.ENOTCONN, errno.EAGAIN}


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to try again after consecutive failures."""

    attempts: int = 5            # retries after the first failure (0: never retry)
    base: float = 0.2            # first delay, seconds; doubles per consecutive failure
    cap: float = 5.0             # longest single delay
    jitter: float = 0.25         # +- this fraction of each delay (spreads reconnect storms)
    deadline: float | None = None  # give up once this many seconds passed since the first failure


def retryable(e: BaseException) -> bool:
    """True for errors a fresh connection may cure: lost peers, timeouts, garbled frames.

    Authentication refusals, the agent's own error answers and a restore
    point that changed are final: trying again gives the same answer.
    """
    if isinstance(e, AuthenticationError | RemoteError):
        return False
    if isinstance(e, ConnectionError | TimeoutError | MoverError | TransportError):
        return True               # ChainError (another restore point) is not among them
    if isinstance(e, ssl.SSLCertVerificationError):
        return False
    if isinstance(e, ssl.SSLError):
        return True               # a TLS record cut or garbled in transit
    if isinstance(e, OSError):
        return e.errno in _NETWORK_ERRNOS or e.errno is None
    return False


class Backoff:
    """Counts consecutive failures of one thing; :meth:`failed` waits or gives up.

    ``give_up(err, failures)`` builds the error raised when the budget is
    spent (default: a TransportError naming ``what``). ``sleep`` and
    ``clock`` are injectable so the rule is unit-tested without waiting.
    """

    def __init__(self, policy: RetryPolicy, what: str, *,
                 give_up: Callable[[BaseException, int], BaseException] | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self.policy = policy
        self.what = what
        self.failures = 0            # consecutive, since the last reset()
        self.total = 0               # every failure, for reports (reconnects)
        self._give_up = give_up
        self._sleep = sleep
        self._clock = clock
        self._rng = rng or random.Random()
        self._since: float | None = None

    def reset(self) -> None:
        """Progress was made: the next failure starts a fresh budget."""
        self.failures = 0
        self._since = None

    def delay(self) -> float:
        """The wait before the next try (after ``failures`` consecutive failures)."""
        p = self.policy
        d = min(p.base * 2 ** max(0, self.failures - 1), p.cap)
        if p.jitter:
            d *= 1 + self._rng.uniform(-p.jitter, p.jitter)
        return max(0.0, d)

    def failed(self, err: BaseException) -> float:
        """Record a failure; re-raise a final one, raise the give-up error, or wait."""
        if not retryable(err):
            raise err
        self.failures += 1
        self.total += 1
        now = self._clock()
        if self._since is None:
            self._since = now
        p = self.policy
        out_of_time = p.deadline is not None and now - self._since >= p.deadline
        if self.failures > p.attempts or out_of_time:
            if self._give_up is not None:
                raise self._give_up(err, self.failures - 1) from None
            raise TransportError(f"{self.what}: {self.failures - 1} retries failed: {err}") \
                from None
        d = self.delay()
        if p.deadline is not None:
            d = min(d, max(0.0, p.deadline - (now - self._since)))
        log.warning("%s: %s; retry %d/%d in %.1f s", self.what, err, self.failures, p.attempts, d)
        self._sleep(d)
        return d


def call(fn: Callable[[], T], policy: RetryPolicy, what: str, *,
         give_up: Callable[[BaseException, int], BaseException] | None = None) -> T:
    """fn() until it succeeds, under the rule: for one-shot steps such as planning
    over the wire, where a lost peer is tried again like a lost data connection."""
    backoff = Backoff(policy, what, give_up=give_up)
    while True:
        try:
            return fn()
        except (OSError, MoverError) as e:
            backoff.failed(e)   # waits, re-raises a final error, or gives up typed
