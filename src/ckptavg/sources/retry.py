"""One retry policy for every request ckptavg sends to a Hub.

A 12B trajectory is hours of downloads; on a cluster the Hub answers 429 and 5xx now and then, and
connections drop or stall. Every request (listing refs and trees, HEAD, header ranges, downloads) goes
through :class:`Attempts`: transient faults are retried with exponential backoff and jitter, honouring
``Retry-After`` (capped), until the policy's total time without progress is spent; then one
:class:`~ckptavg.errors.HubUnavailableError` names the file and what was tried. 401/403/404 and any
other answer are not retried: the caller translates them.

huggingface_hub retries some requests itself (``http_backoff``: 5 retries, up to 23 s, for tree
listings; ``http_get``: 429 and dropped bodies; ``hf_hub_download``: its HEAD). ckptavg sends those
requests through the client's session and error types but not through those helpers, so a fault is
retried once, here, under one clock.

Tests shrink the backoff with ``CKPTAVG_RETRY_BASE`` (seconds of the first delay; the cap scales with
it), or pass a :class:`RetryPolicy`.
"""

from __future__ import annotations

import email.utils
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from threading import Event
from typing import TypeVar

from ckptavg.errors import HubUnavailableError

T = TypeVar("T")

DEFAULT_TOTAL = 600.0  # minutes, not seconds: a Hub outage of a few minutes should not end a day's run
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class Cancelled(Exception):
    """The run that asked for a request ended: stop waiting and sending (not a fault, never retried)."""


class BodyCutShort(Exception):
    """A response ended before the bytes its Content-Length promised (a dropped body): transient."""


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep trying one request, and how to wait between attempts.

    ``total`` counts the seconds since the request last made progress (a download that keeps
    receiving bytes between drops is never given up). The n-th wait is drawn from
    ``[d/2, d]`` with ``d = min(first_delay * 2**n, max_delay)``; a ``Retry-After`` from the server
    replaces it, capped at ``max_delay``."""

    total: float = DEFAULT_TOTAL
    first_delay: float = 1.0
    max_delay: float = 60.0

    @classmethod
    def with_total(cls, total: float | None) -> RetryPolicy:
        """The default waits (``CKPTAVG_RETRY_BASE`` scales them, for tests) under ``total`` seconds."""
        base = float(os.environ.get("CKPTAVG_RETRY_BASE", "1"))
        return cls(total=DEFAULT_TOTAL if total is None else total, first_delay=base, max_delay=60 * base)

    def attempts(self, where: str, action: str, cancel: Event | None = None) -> Attempts:
        return Attempts(self, where, action, cancel)

    def call(self, fn: Callable[[], T], *, where: str, action: str) -> T:
        """``fn()``, retried on transient faults."""
        attempts = self.attempts(where, action)
        while True:
            try:
                return fn()
            except Exception as e:
                if not attempts.retry(e):
                    raise


class Attempts:
    """The attempts at one request. ``retry(e)`` after a failure: False if ``e`` is not transient (the
    caller re-raises it), True after waiting if another attempt fits in the time left, and
    :class:`HubUnavailableError` when none does."""

    def __init__(self, policy: RetryPolicy, where: str, action: str, cancel: Event | None = None) -> None:
        self.policy, self.where, self.action = policy, where, action
        self.cancel = cancel  # set when the run ends: a backoff stops waiting
        self.count = 0
        self.start = self.first = time.monotonic()
        self.delay = policy.first_delay
        self.at_once = False

    def progressed(self) -> None:
        """The request moved forward (a download received bytes before it dropped): its clock and backoff
        start again, and the next attempt goes at once: a connection cut mid-body is a network fault, not
        a server asking for patience, and each such retry is bounded by the bytes left to fetch."""
        self.start = time.monotonic()
        self.delay = self.policy.first_delay
        self.at_once = True

    def retry(self, e: BaseException) -> bool:
        fault = transient(e)
        if fault is None:
            return False
        last, retry_after = fault
        self.count += 1
        wait = 0.0 if self.at_once else random.uniform(self.delay / 2, self.delay)
        self.at_once = False
        if retry_after is not None:
            wait = min(retry_after, self.policy.max_delay)
        if time.monotonic() - self.start + wait > self.policy.total:
            seconds = time.monotonic() - self.first
            shown = f"{seconds:.0f}" if seconds >= 10 else f"{seconds:.1f}"
            raise HubUnavailableError(
                f"{self.where}: gave up {self.action} after {self.count} attempt{'s' * (self.count != 1)} "
                f"in {shown} s (last: {last}); run the same command again to resume",
                attempts=self.count,
                seconds=seconds,
                last=last,
            ) from e
        if self.cancel is None:
            time.sleep(wait)
        elif self.cancel.wait(wait):
            raise Cancelled(f"{self.where}: the run using it ended") from e
        if wait:
            self.delay = min(self.delay * 2, self.policy.max_delay)
        return True


def transient(e: BaseException) -> tuple[str, float | None] | None:
    """``(what happened, Retry-After seconds)`` for a fault worth retrying, else None.

    HTTP 408, 429 and 5xx answers come as huggingface_hub's ``HfHubHTTPError`` with the response;
    dropped connections and timeouts as its HTTP library's transport errors (``httpx2`` in
    huggingface_hub 2.4, ``httpx`` before: matched by name so either works)."""
    if isinstance(e, BodyCutShort):
        return f"connection dropped: {e}", None
    response = getattr(e, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(status, int):
        if status in _TRANSIENT_STATUS or 500 <= status < 600:
            return f"HTTP {status}", _retry_after(response)
        return None
    names = {c.__name__ for c in type(e).__mro__ if c.__module__.split(".")[0].startswith("httpx")}
    if names & {"TimeoutException", "NetworkError", "RemoteProtocolError"}:
        return type(e).__name__, None
    return None


def _retry_after(response: object) -> float | None:
    """The ``Retry-After`` header in seconds (a number, or an HTTP date), if there is one."""
    headers = getattr(response, "headers", None)
    value = headers.get("Retry-After") if headers is not None else None
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
