"""The dashboards' few minutes of history, on a clock the test moves."""

from __future__ import annotations

import random

from ghubai.observability.history import History


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_stream_counts_its_tokens_over_the_steps_it_ran_in() -> None:
    clock = Clock(1000.0)
    history = History(step_s=2.0, steps=10, clock=clock, wall=clock)
    clock.now = 1008.0  # a stream of 200 tokens, first token 0.5 s after it began at 1000.0, ends now
    history.request(0.5, tokens=200, generating_s=7.5)
    clock.now = 1010.0
    points = history.points()
    assert [point["t"] for point in points] == [1002.0, 1004.0, 1006.0, 1008.0, 1010.0]
    assert [point["tokens_per_s"] for point in points] == [20.0, 26.7, 26.7, 26.7, 0.0]  # 200 tokens over 7.5 s
    assert [point["requests_per_s"] for point in points] == [0.0, 0.0, 0.0, 0.0, 0.5]
    # its first token left at 1000.5: its time to first token shows there, not at its end (review)
    assert [point["ttft_ms"] for point in points] == [500.0, None, None, None, None]


def test_a_busy_step_s_median_is_a_sample_s() -> None:
    """Memory stays per step: past ``SAMPLES`` first tokens a step keeps a uniform sample of them
    (the late ones as likely as the first: a step whose first tokens slow down shows it)."""
    random.seed(7)
    clock = Clock(0.5)
    history = History(step_s=1.0, steps=3, clock=clock)
    for request in range(20_000):
        history.request(0.1 if request < 5_000 else 0.3)
    clock.now = 1.0
    step = history._steps[0]
    assert (len(step.first_tokens), step.seen) == (101, 20_000)
    assert 60 <= step.first_tokens.count(0.3) <= 90  # 3 in 4 of them, about 76
    assert history.points()[-1]["ttft_ms"] == 300.0


def test_a_first_token_in_the_oldest_step_shown_is_shown() -> None:
    """Review: a stream whose first token left in the oldest step of the window had its tokens
    shown there, and not its first-token time."""
    clock = Clock(0.0)
    history = History(step_s=1.0, steps=2, clock=clock)
    clock.now = 2.5
    history.request(0.2, tokens=20, generating_s=2.0)  # first token at 0.5: step 0, the oldest kept
    clock.now = 2.9
    assert [point["ttft_ms"] for point in history.points()] == [200.0, None]


def test_the_window_keeps_only_the_last_steps() -> None:
    clock = Clock(0.0)
    history = History(step_s=1.0, steps=3, clock=clock)
    for second in range(10):
        clock.now = second + 0.5
        history.request(0.01, tokens=second)
    clock.now = 10.0
    assert [point["tokens_per_s"] for point in history.points()] == [7.0, 8.0, 9.0]


def test_a_wall_clock_stepped_back_neither_hides_the_chart_nor_brings_old_steps_back() -> None:
    """Regression (hunt): steps were counted on the wall clock. NTP stepping it back an hour (a
    machine that booted with its clock in local time) left the chart empty for that hour, and then
    added the hour-old steps to the live ones (505 tokens/s on a grid doing 5)."""
    clock, wall = Clock(50.0), Clock(1_000_000.0)
    history = History(step_s=1.0, steps=3, clock=clock, wall=wall)
    for second in range(3):
        clock.now, wall.now = 50.5 + second, 1_000_000.5 + second
        history.request(0.01, tokens=500)
    wall.now -= 3600.0  # stepped back; the monotonic clock goes on
    for second in range(3, 10):
        clock.now, wall.now = 50.5 + second, wall.now + 1.0
        history.request(0.01, tokens=5)
    clock.now, wall.now = 60.0, wall.now + 0.5
    points = history.points()
    assert [point["tokens_per_s"] for point in points] == [5.0, 5.0, 5.0]
    assert [point["t"] for point in points] == [wall.now - 2.0, wall.now - 1.0, wall.now]
