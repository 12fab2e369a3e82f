"""The SDE window schedule (MultiCrafter Algorithm 1) and its seeded random variant."""

from __future__ import annotations

import pytest

from samplers import SamplerConfig, random_window_at, window_at


def test_paper_setting_over_2000_iterations():
    T, w, tau, s = 16, 2, 50, 1
    starts = []
    for m in range(2000):
        window = window_at(m, T, w, tau, s)
        assert len(window) == w and window == list(range(window[0], window[0] + w))
        assert 0 <= window[0] and window[-1] < T
        starts.append(window[0])
    moves = [m for m in range(1, 2000) if starts[m] != starts[m - 1]]
    assert moves == list(range(50, 701, 50))  # every 50 iterations, 14 moves in all
    assert [starts[m] for m in range(0, 701, 50)] == list(range(15))  # 0, 1, ..., 14
    assert set(starts[700:]) == {14}  # then it stays at T - w, never shrinking


def test_algorithm_1_update_rule_step_by_step():
    """Replay Algorithm 1 literally (l <- min(l + s, T - w) when m mod tau == 0, m 1-based after the
    update) and compare with the closed form at the 0-based iteration."""
    T, w, tau, s = 10, 3, 7, 2
    left = 0
    for m in range(1, 200):
        assert window_at(m - 1, T, w, tau, s) == list(range(left, left + w))
        if m % tau == 0:
            left = min(left + s, T - w)


def test_stride_zero_and_full_window():
    assert window_at(10_000, 16, 2, 50, 0) == [0, 1]
    assert window_at(123, 4, 4, 1, 1) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "args, message",
    [((0, 16, 0, 50, 1), "window size"), ((0, 16, 17, 50, 1), "window size"), ((0, 16, 2, 0, 1), "shift_interval"), ((-1, 16, 2, 50, 1), "iteration"), ((0, 16, 2, 50, -1), "stride")],
)
def test_invalid_window_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        window_at(*args)


def test_random_window_depends_only_on_seed_and_iteration():
    windows = [random_window_at(7, m, 16, 3) for m in range(400)]
    assert windows == [random_window_at(7, m, 16, 3) for m in range(400)]
    assert all(len(wd) == 3 and wd == list(range(wd[0], wd[0] + 3)) and wd[-1] < 16 for wd in windows)
    assert {wd[0] for wd in windows} == set(range(14))  # every start in [0, T - w] occurs
    assert windows != [random_window_at(8, m, 16, 3) for m in range(400)]


def test_sampler_config_window():
    assert SamplerConfig().window(120, seed=0) == [2, 3]
    random = SamplerConfig(window_strategy="random", window_size=3)
    assert random.window(5, seed=1) == random_window_at(1, 5, 16, 3)
