"""infra.retry: the one Retry-After parser, the jittered backoff and the call-again helper."""

from __future__ import annotations

import random
from email.utils import formatdate

import pytest

from infra.retry import RETRY_AFTER_MAX_S, Backoff, call_with_retries, parse_retry_after

NOW = 1_800_000_000.0


class Flaky(Exception):
    def __init__(self, retriable: bool = True, retry_after: float | None = None) -> None:
        super().__init__("flaky")
        self.retriable, self.retry_after = retriable, retry_after


class Script:
    """A call that raises the given errors in turn, then answers ``"ok"``; records the fake time."""

    def __init__(self, *errors: Exception) -> None:
        self.errors, self.calls, self.now, self.sleeps = list(errors), 0, 0.0, []

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


def run(script: Script, **kw: object) -> str:
    defaults: dict[str, object] = dict(
        retriable=lambda e: isinstance(e, Flaky) and e.retriable,
        wait=lambda n: 0.5 * 2**n,
        sleep=script.sleep,
        clock=script.clock,
    )
    return call_with_retries(script, **{**defaults, **kw})  # type: ignore[arg-type]


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert parse_retry_after("7", 1.0) == 7.0
    assert parse_retry_after(" 2.5 ", 1.0) == 2.5
    assert parse_retry_after("0", 1.0) == 0.0
    assert parse_retry_after(formatdate(NOW + 30, usegmt=True), 1.0, now=lambda: NOW) == pytest.approx(30.0)
    assert parse_retry_after(formatdate(NOW - 30, usegmt=True), 1.0, now=lambda: NOW) == 0.0  # already past


@pytest.mark.parametrize("value", [None, "", "  ", "-3", "soon", "nan", "inf", "Mon, 99 Foo 2026"])
def test_retry_after_falls_back_to_the_default(value: str | None) -> None:
    assert parse_retry_after(value, 2.0) == 2.0


def test_backoff_has_equal_jitter_within_its_cap() -> None:
    backoff, rng = Backoff(0.5, 30.0), random.Random(3)
    for attempt in range(40):
        cap = min(30.0, 0.5 * 2**attempt)
        assert cap / 2 <= backoff.delay(attempt, rng) <= cap


def test_retries_a_retriable_error_with_the_backoff() -> None:
    script = Script(Flaky(), Flaky())
    assert run(script, attempts=4) == "ok"
    assert script.calls == 3
    assert script.sleeps == [0.5, 1.0]


def test_honours_retry_after_and_caps_every_wait() -> None:
    script = Script(Flaky(retry_after=7.0), Flaky(retry_after=99.0), Flaky())
    assert run(script, retry_after=lambda e: e.retry_after, maximum_s=30.0) == "ok"
    assert script.sleeps == [7.0, 30.0, 2.0]


def test_raises_the_last_error_itself_when_attempts_run_out() -> None:
    last = Flaky()
    script = Script(Flaky(), Flaky(), last)
    with pytest.raises(Flaky) as caught:
        run(script, attempts=3)
    assert caught.value is last
    assert script.calls == 3 and len(script.sleeps) == 2


def test_a_permanent_error_is_not_retried() -> None:
    script = Script(Flaky(retriable=False))
    with pytest.raises(Flaky):
        run(script, attempts=5)
    assert script.calls == 1 and script.sleeps == []
    other = Script(KeyError("bug"))
    with pytest.raises(KeyError):
        run(other)
    assert other.calls == 1


def test_stops_when_the_next_wait_would_pass_the_deadline() -> None:
    script = Script(*[Flaky() for _ in range(10)])
    with pytest.raises(Flaky):
        run(script, wait=lambda n: 1.0, deadline_s=3.5)
    assert script.sleeps == [1.0, 1.0, 1.0]  # a fourth would end at 4.0 > 3.5
    assert script.calls == 4


def test_before_sleep_sees_each_retry_and_sleep_may_abandon() -> None:
    seen: list[tuple[str, int, float]] = []

    class Stop(Exception):
        pass

    def sleep(seconds: float) -> None:
        if len(seen) == 2:
            raise Stop

    script = Script(*[Flaky() for _ in range(5)])
    with pytest.raises(Stop):
        run(script, sleep=sleep, before_sleep=lambda e, n, s: seen.append((str(e), n, s)))
    assert seen == [("flaky", 1, 0.5), ("flaky", 2, 1.0)]


@pytest.mark.parametrize(
    ("value", "kwargs", "expected"),
    [
        ("86400", {}, RETRY_AFTER_MAX_S),  # a day: capped at the default
        ("1e308", {}, RETRY_AFTER_MAX_S),
        ("7", {"maximum_s": 5.0}, 5.0),  # the caller's remaining deadline
        ("7", {"maximum_s": float("nan")}, 0.0),
        ("7", {"maximum_s": -1.0}, 0.0),
        ("7", {"maximum_s": float("inf")}, 7.0),
        (None, {"maximum_s": 0.5}, 0.5),  # the default is capped too
        ("Fri, 31 Dec 9999 23:59:59 GMT", {}, RETRY_AFTER_MAX_S),  # a date far away
    ],
)
def test_retry_after_is_capped(value: str | None, kwargs: dict, expected: float) -> None:
    assert parse_retry_after(value, 1.0, now=lambda: NOW, **kwargs) == expected


@pytest.mark.parametrize("default", [float("nan"), -5.0])
def test_retry_after_never_waits_a_negative_or_nan_time(default: float) -> None:
    assert parse_retry_after(None, default) == 0.0
    assert parse_retry_after("Mon, 99 Foo 2026", default) == 0.0
