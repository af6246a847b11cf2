"""Client deadlines: the `X-Request-Timeout` header of POST /recommend and /recommend/stream.

A caller with a timeout of its own (a gateway, a page that gives up) says how long it will wait,
in seconds, and the service does not spend the model's time on the request past that:

    X-Request-Timeout: 2.5

The value is a decimal number of seconds, more than 0 and at most `MAX_TIMEOUT_S` (an hour),
with at most 3 decimals (milliseconds): `2`, `0.25`, `30.5` (`PATTERN`). No sign, exponent,
unit or spaces inside; a value that is not of this form, out of range, or sent twice is a 400 `invalid_header`
naming the header. Like gRPC's `grpc-timeout` (and unlike Envoy's `x-envoy-expected-rq-timeout-ms`,
whose unit is in its name) it is relative, so the two clocks need not agree: the deadline is
counted from when the server began to receive the request (service/access_log.py stamps it),
its body's upload included. 0 is refused rather than read as "none" (Envoy's route timeouts
read 0 so): leave the header out for no deadline of the client's.

What it bounds (service/state.py `ServiceState.recommend`, docs/operations.md "Client
deadlines"): the wait in the queue and the model's work on the request. Where it passes first,
the request is dropped: from the queue, before it takes a decode slot, or from the decode, whose
slot goes to the next request at the next token (continuous batching; a static batch runs to
its end, the answer unused). The client gets 504 `deadline_exceeded` (the queue's with a
Retry-After: there was no room in time), counted in r2ec_deadline_exceeded_total by stage.
The server's own limits (R2EC_MAX_QUEUE_WAIT_S) still apply: the earlier one wins.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

HEADER = "X-Request-Timeout"
MAX_TIMEOUT_S = 3600.0
_NUMBER = re.compile(r"[0-9]+(\.[0-9]+)?")
# every valid value and nothing else: above 0, at most 3600, at most 3 decimals (leading zeros
# allowed). The OpenAPI document gives it as the header's pattern, so a client generated from
# the schema (or schemathesis) knows which values the service takes; tests check it against
# the rule as stated (tests/service/test_deadline.py)
PATTERN = (
    r"^0*(?:0\.(?:[1-9][0-9]{0,2}|0[1-9][0-9]?|00[1-9])"
    r"|(?:[1-9][0-9]{0,2}|[12][0-9]{3}|3[0-5][0-9]{2})(?:\.[0-9]{1,3})?"
    r"|3600(?:\.0{1,3})?)$"
)
_VALID = re.compile(PATTERN)
STAGES = ("queued", "decoding")  # r2ec_deadline_exceeded_total's reason label

DESCRIPTION = (
    "How long the caller waits for the answer, in seconds: a decimal number above 0 and at most "
    "3600, with at most 3 decimals (2, 0.25, 30.5), counted from when the server began to "
    "receive the request. A request still queued or decoding when it passes is dropped and "
    "answered 504 deadline_exceeded (from the queue with Retry-After), and its decode slot goes "
    "to the next request. R2EC_MAX_QUEUE_WAIT_S still applies. Malformed, out of range or sent "
    "twice: 400 invalid_header. Leave it out for no deadline."
)


class InvalidHeader(ValueError):
    """A request header the service reads is malformed: a 400 naming it (service/errors.py)."""

    def __init__(self, header: str, problem: str) -> None:
        super().__init__(f"{header}: {problem}")
        self.header, self.problem = header, problem


@dataclass(frozen=True)
class Deadline:
    """A request's deadline: `timeout_s` as sent, `at` the time.perf_counter() it passes."""

    timeout_s: float
    at: float

    def left(self) -> float:
        """Seconds until it passes (<= 0: passed)."""
        return self.at - time.perf_counter()


class DeadlineExceeded(Exception):
    """A request's deadline passed while it was `stage` ("queued": before the model took it;
    "decoding": while the model worked on it). `retry_after_s`: when the queue may have room,
    for a queued one; None for one that was decoding (its budget was too short for its work)."""

    def __init__(self, deadline: Deadline, stage: str, retry_after_s: float | None = None) -> None:
        if stage == "queued":
            what = (
                f"passed while the request waited for the model; it was dropped before it took a "
                f"decode slot: retry later, or with a longer {HEADER}"
            )
        else:
            what = (
                "passed while the model was working on the request; it was dropped and its decode "
                f"slot freed: ask for less reasoning (max_reasoning_tokens, or reasoning: false) or "
                f"give it a longer {HEADER}"
            )
        super().__init__(f"deadline exceeded: the request's {HEADER} of {deadline.timeout_s:g} s {what}")
        self.deadline, self.stage, self.retry_after_s = deadline, stage, retry_after_s


def parse_timeout(values: list[str]) -> float | None:
    """The seconds the header's values give (None: not sent); InvalidHeader otherwise."""
    if not values:
        return None
    if len(values) > 1:
        raise InvalidHeader(HEADER, "sent more than once: send it once")
    value = values[0].strip()
    # what was sent is not copied back (service/errors.py)
    if not _NUMBER.fullmatch(value):
        raise InvalidHeader(
            HEADER,
            "not a number of seconds: give a decimal number with at most 3 decimals, no sign, "
            "exponent, unit or spaces (2, 0.25, 30.5)",
        )
    if not _VALID.fullmatch(value):
        raise InvalidHeader(
            HEADER,
            f"must be above 0 and at most {MAX_TIMEOUT_S:g} seconds with at most 3 decimals; leave "
            "it out for no deadline",
        )
    return float(value)


def request_deadline(values: list[str], received_at: float | None) -> Deadline | None:
    """The deadline of a request whose header values are `values`, received at `received_at`
    (time.perf_counter(); None: now)."""
    seconds = parse_timeout(values)
    if seconds is None:
        return None
    start = time.perf_counter() if received_at is None else received_at
    return Deadline(seconds, start + seconds)
