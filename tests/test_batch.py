"""The one batch runner: outcomes, failures that do not stop the batch, halting, time budget, ETA, exit codes."""

from __future__ import annotations

import pytest

from lpfm_toolkit.batch import (
    EXIT_FAILED,
    EXIT_OK,
    BatchProgress,
    EtaClock,
    Outcome,
    Status,
    counts,
    exit_code,
    run_items,
    summary,
    summary_rows,
)
from lpfm_toolkit.errors import ConnectionFailedError, RegionError


class FakeClock:
    """A clock the items advance, so times and ETAs are exact."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_each_item_gets_an_outcome_and_a_failure_does_not_stop_the_rest() -> None:
    clock = FakeClock()

    def run_one(item: str, tiles) -> Outcome:
        clock.now += 2.0
        if item == "b":
            raise RegionError("region outside b", "pick another")
        if item == "c":
            return Outcome(item, Status.SKIPPED, result="c.ome.tiff")
        return Outcome(item, Status.DONE, result=f"{item}.ome.tiff")

    outcomes = run_items(["a", "b", "c"], run_one, clock=clock)
    assert [o.status for o in outcomes] == [Status.DONE, Status.FAILED, Status.SKIPPED]
    assert outcomes[1].error == "region outside b — pick another"
    assert [o.seconds for o in outcomes] == [2.0, 2.0, 2.0]
    assert exit_code(outcomes) == EXIT_FAILED == 1
    assert summary(outcomes) == "1 done, 1 skipped, 1 failed"
    assert counts(outcomes) == {Status.DONE: 1, Status.SKIPPED: 1, Status.FAILED: 1}


def test_a_bug_is_not_recorded_as_a_failed_item() -> None:
    def run_one(item: int, tiles) -> Outcome:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        run_items([1], run_one)


def test_a_foreign_error_is_named_with_its_type() -> None:
    def run_one(item: int, tiles) -> Outcome:
        raise OSError("disk full\nsecond line")

    (outcome,) = run_items([1], run_one, label=lambda i: f"item {i}")
    assert outcome.item == "item 1" and outcome.error == "OSError: disk full second line"


def test_halt_marks_every_later_item_not_run_with_the_reason() -> None:
    ran = []

    def run_one(item: int, tiles) -> Outcome:
        ran.append(item)
        if item == 2:
            raise ConnectionFailedError("session expired")
        return Outcome(str(item), Status.DONE)

    def halt(exc: BaseException) -> str | None:
        return "the OMERO session was lost" if isinstance(exc, ConnectionFailedError) else None

    outcomes = run_items([1, 2, 3, 4], run_one, halt=halt)
    assert ran == [1, 2]
    assert [o.status for o in outcomes] == [Status.DONE, Status.FAILED, Status.NOT_RUN, Status.NOT_RUN]
    assert outcomes[3].error == "not run: the OMERO session was lost"
    assert exit_code(outcomes) == EXIT_FAILED


def test_time_budget_stops_before_an_item_that_would_not_finish() -> None:
    clock = FakeClock()

    def run_one(item: int, tiles) -> Outcome:
        clock.now += 10.0
        return Outcome(str(item), Status.DONE)

    outcomes = run_items([1, 2, 3, 4], run_one, budget_s=25.0, clock=clock)
    # after two items (20 s) a third of 10 s would end at 30 s > 25 s
    assert [o.status for o in outcomes] == [Status.DONE, Status.DONE, Status.NOT_RUN, Status.NOT_RUN]
    assert "time budget" in (outcomes[2].error or "")
    assert exit_code(outcomes) == EXIT_FAILED  # work was left undone


def test_exit_code_rule() -> None:
    assert exit_code([]) == EXIT_OK == 0
    ok = [Outcome("a", Status.DONE), Outcome("b", Status.SKIPPED), Outcome("c", Status.NOTHING)]
    assert exit_code(ok) == EXIT_OK and all(o.ok for o in ok)
    assert exit_code([*ok, Outcome("d", Status.NOT_RUN)]) == EXIT_FAILED
    assert summary([]) == "nothing to do"


def test_progress_reports_tiles_and_etas_per_item_and_overall() -> None:
    clock = FakeClock()
    seen: list[BatchProgress] = []

    def run_one(item: str, tiles) -> Outcome:
        if item == "skip":
            return Outcome(item, Status.SKIPPED)
        for done in range(1, 5):  # 4 tiles of 1 s
            clock.now += 1.0
            tiles(done, 4)
        return Outcome(item, Status.DONE)

    run_items(["a", "skip", "b"], run_one, progress=seen.append, clock=clock)
    first = [p for p in seen if p.label == "a" and p.outcome is None]
    assert first[0].tiles_total == 0 and first[0].eta_s is None  # nothing to go by yet
    one_tile = first[1]
    assert (one_tile.tiles_done, one_tile.tiles_total) == (1, 4)
    assert one_tile.item_eta_s == pytest.approx(3.0)
    # the first item: 3 s left of it, and the two after it assumed as long (4 s each)
    assert one_tile.eta_s == pytest.approx(3.0 + 2 * 4.0)
    after_a = next(p for p in seen if p.outcome is not None and p.label == "a")
    assert after_a.finished == 1 and after_a.eta_s == pytest.approx(8.0)
    b_half = next(p for p in seen if p.label == "b" and p.tiles_done == 2)
    # one item computed in 4 s of wall time (the skipped one cost nothing): b has 2 s left, nothing after it
    assert b_half.item_eta_s == pytest.approx(2.0) and b_half.eta_s == pytest.approx(2.0)
    assert seen[-1].finished == 3 and seen[-1].eta_s == 0.0


def test_eta_clock_divides_wall_time_for_concurrent_batches() -> None:
    clock = FakeClock()
    eta = EtaClock(6, clock)
    clock.now += 10.0  # two workers finish two items in 10 s of wall time
    eta.finish(Outcome("a", Status.DONE, seconds=10.0))
    eta.finish(Outcome("b", Status.DONE, seconds=10.0))
    assert eta.eta() == pytest.approx(4 * 5.0)


def test_summary_rows() -> None:
    rows = summary_rows(
        [Outcome("a", Status.DONE, result="a.ome.tiff", seconds=1.25), Outcome("b", Status.FAILED, error="bad")]
    )
    assert rows == [("a", Status.DONE, "a.ome.tiff", "1.2 s", ""), ("b", Status.FAILED, "", "", "bad")]


def test_cli_summary_table_and_exit(capsys) -> None:
    from rich.console import Console

    from lpfm_toolkit.cli import batch as cli_batch

    outcomes = [
        Outcome("slide.svs · level 0", Status.DONE, result="out/slide.ome.tiff", seconds=3.0),
        Outcome("other.svs · level 0", Status.FAILED, error="RegionError: outside"),
    ]
    console = Console(record=True, width=200)
    console.print(cli_batch.summary_table(outcomes, "lpfm enhance · sr x2"))
    text = console.export_text()
    assert "slide.svs · level 0" in text and "failed" in text and "RegionError: outside" in text
    with cli_batch.batch_progress("items") as update:
        update(BatchProgress(0, 2, "slide.svs", 0, 1, 4, 3.0, 9.0))
        update(BatchProgress(0, 2, "slide.svs", 1, eta_s=5.0, outcome=outcomes[0]))
    assert cli_batch.eta_text(None) == "ETA …" and cli_batch.eta_text(75) == "ETA 1:15"
    assert cli_batch.eta_text(3725) == "ETA 1:02:05"
    with pytest.raises(SystemExit) as info:
        cli_batch.report_batch(outcomes, "t")
    assert info.value.code == 1
    cli_batch.report_batch(outcomes[:1], "t")  # all done: returns, exit 0
    assert "1 done" in capsys.readouterr().out


def test_kept_open_shares_one_resource_among_consecutive_items() -> None:
    from lpfm_toolkit.batch import KeptOpen

    log: list[str] = []

    def open_(key: str) -> str:
        if key == "bad":
            raise OSError("cannot open")
        log.append(f"open {key}")
        return key.upper()

    with KeptOpen(open_, lambda v: log.append(f"close {v}")) as kept:
        assert kept.get("a") == "A" and kept.get("a") == "A"
        assert kept.get("b") == "B"
        with pytest.raises(OSError):
            kept.get("bad")
        assert kept.get("b") == "B"  # the failed open was not kept: b opens again
    assert log == ["open a", "close A", "open b", "close B", "open b", "close B"]
