"""Piped progress: a line on the clock even when one step of a stage takes longer than the interval."""

from __future__ import annotations

import time

from selfalign import logs


def _lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if "selfalign:" in line]


def test_a_stage_stuck_in_one_step_still_prints_and_only_the_innermost_bar_does(monkeypatch, capsys):
    """Before the clock thread a bar printed only from update(): a 6-minute generate() call printed nothing."""
    logs.setup()
    monkeypatch.setenv("SELFALIGN_PROGRESS_EVERY", "0.1")
    outer = logs.PlainProgress(total=6, desc="eval")
    inner = logs.PlainProgress(total=4, desc="generate")
    time.sleep(0.6)  # no update at all: a single long step
    lines = _lines(capsys)
    assert sum("generate: 0/4" in line for line in lines) >= 2, lines
    assert not any("eval:" in line for line in lines)
    inner.close()
    time.sleep(0.4)
    lines = _lines(capsys)
    assert lines and all("eval: 0/6" in line for line in lines), lines  # back to the outer bar
    outer.update(6)  # reaching the total finishes a bar that nobody closes
    capsys.readouterr()
    time.sleep(0.4)
    assert _lines(capsys) == []


def test_an_abandoned_bar_stops_printing(monkeypatch, capsys):
    """A bar dropped by an exception (never closed) leaves the clock when it is collected."""
    logs.setup()
    monkeypatch.setenv("SELFALIGN_PROGRESS_EVERY", "0.1")

    def stage() -> None:
        bar = logs.PlainProgress(total=3, desc="judge")
        bar.update(1)
        raise RuntimeError("judge down")

    try:
        stage()
    except RuntimeError:
        pass
    capsys.readouterr()
    time.sleep(0.4)
    assert _lines(capsys) == []


def test_iterating_closes_the_bar(monkeypatch, capsys):
    logs.setup()
    monkeypatch.setenv("SELFALIGN_PROGRESS_EVERY", "0.1")
    bar = logs.PlainProgress(range(2), desc="batches")
    assert list(bar) == [0, 1] and bar.closed
