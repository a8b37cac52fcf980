"""The dashboards' few minutes of history, on a clock the test moves."""

from __future__ import annotations

from ghubai.observability.history import History


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_stream_counts_its_tokens_over_the_steps_it_ran_in() -> None:
    clock = Clock(1000.0)
    history = History(step_s=2.0, steps=10, clock=clock)
    clock.now = 1008.0  # a stream of 200 tokens, first token 0.5 s after it began at 1000.0, ends now
    history.request(0.5, tokens=200, generating_s=7.5)
    clock.now = 1010.0
    points = history.points()
    assert [point["t"] for point in points] == [1002.0, 1004.0, 1006.0, 1008.0, 1010.0]
    assert [point["tokens_per_s"] for point in points] == [20.0, 26.7, 26.7, 26.7, 0.0]  # 200 tokens over 7.5 s
    assert [point["requests_per_s"] for point in points] == [0.0, 0.0, 0.0, 0.0, 0.5]
    assert points[-1]["ttft_ms"] == 500.0 and points[0]["ttft_ms"] is None


def test_the_window_keeps_only_the_last_steps() -> None:
    clock = Clock(0.0)
    history = History(step_s=1.0, steps=3, clock=clock)
    for second in range(10):
        clock.now = second + 0.5
        history.request(0.01, tokens=second)
    clock.now = 10.0
    assert [point["tokens_per_s"] for point in history.points()] == [7.0, 8.0, 9.0]
