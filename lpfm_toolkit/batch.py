"""One batch runner for every entry point: :func:`run_items`, an :class:`Outcome` per item, one exit-code rule.

``lpfm enhance``, ``lpfm qupath enhance``, ``lpfm omero enhance``, the OMERO.script and ``lpfm jobs run`` all
report their work as :class:`Outcome` s with the same :class:`Status` words, the same summary (:func:`summary`,
:func:`summary_rows`) and the same exit code (:func:`exit_code`). One item failing never stops the others; a
``halt`` rule (the OMERO session was lost) or a time budget marks the rest ``not run``, each with the reason.

Progress is data: :func:`run_items` calls ``progress`` with a :class:`BatchProgress` snapshot (item, tiles,
ETA of the item and of the whole batch) and the CLI draws it. Library code here never prints.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Generic, TypeVar

from lpfm_toolkit.errors import LpfmError

log = logging.getLogger(__name__)

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")


class Status(str, Enum):
    """What happened to one item."""

    DONE = "done"  #: made now
    SKIPPED = "skipped"  #: an identical result was already there; nothing was recomputed
    FAILED = "failed"  #: tried and failed (``Outcome.error`` says why)
    NOTHING = "nothing to do"  #: selected, but there is nothing to run (no ROI of the class, no area)
    NOT_RUN = "not run"  #: not tried: the batch stopped before it (time budget, session lost)

    def __str__(self) -> str:
        return self.value


#: the statuses that leave work undone: any of them makes the exit code 1
INCOMPLETE = frozenset({Status.FAILED, Status.NOT_RUN})
#: exit codes: all done or skipped · an item failed or was not run · bad input before any work
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


@dataclass
class Outcome:
    """What happened to one work item.

    ``item``: how the item is shown (``slide.svs · level 0``, ``3: slide.svs · Tumor 1``); ``result``: where its
    result is (a file, ``entry 7: name``, ``image 42``); ``detail``: connector data the caller keeps (a new
    image id, an entry id) and no table shows.
    """

    item: str
    status: Status
    result: str | None = None
    error: str | None = None
    seconds: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status not in INCOMPLETE


@dataclass(frozen=True)
class BatchProgress:
    """Where a batch stands, for a progress display.

    ``index``: the item being run (0-based) of ``total``; ``finished``: items finished so far; ``tiles_done`` /
    ``tiles_total``: the running item's tiles (0/0 before its first tile); ``item_eta_s`` / ``eta_s``: seconds
    left for this item and for the whole batch (None until there is something to go by); ``outcome``: set
    when the item has just finished.
    """

    index: int
    total: int
    label: str
    finished: int
    tiles_done: int = 0
    tiles_total: int = 0
    item_eta_s: float | None = None
    eta_s: float | None = None
    outcome: Outcome | None = None


BatchProgressFn = Callable[[BatchProgress], None]
#: run_one(item, tile_progress) → the item's outcome; tile_progress(done, total) as ``run_item`` calls it
RunOne = Callable[[T, Callable[[int, int], None]], Outcome]


class EtaClock:
    """Estimates time left from the items that computed (skipped ones cost ~nothing) and the running one's tiles.

    Works for concurrent batches too: the estimate divides wall time, not summed item time, by the items done.
    """

    def __init__(self, total: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self._clock = clock
        self._t0 = clock()
        self._item_t0: float | None = None
        self.finished = 0
        self.computed = 0
        self.seconds: list[float] = []

    def start_item(self) -> None:
        self._item_t0 = self._clock()

    def finish(self, outcome: Outcome) -> None:
        self.finished += 1
        if outcome.status in (Status.DONE, Status.FAILED):
            self.computed += 1
            self.seconds.append(outcome.seconds)
        self._item_t0 = None

    def item_eta(self, done: int, total: int) -> float | None:
        """Seconds left for the running item, from its tiles' pace."""
        if self._item_t0 is None or done <= 0 or total <= 0:
            return None
        return (self._clock() - self._item_t0) / done * max(0, total - done)

    def eta(self, done: int = 0, total: int = 0) -> float | None:
        """Seconds left for the batch: the running item's rest plus the items after it at the pace so far."""
        left = max(0, self.total - self.finished)
        if not left:
            return 0.0
        item_left = self.item_eta(done, total)
        if self.computed:
            per_item = (self._clock() - self._t0) / self.computed
            if item_left is None:
                return per_item * left
            return item_left + per_item * (left - 1)
        if item_left is not None and self._item_t0 is not None:  # the first item: assume the others alike
            whole = self._clock() - self._item_t0 + item_left
            return item_left + whole * (left - 1)
        return None

    def over(self, budget_s: float | None) -> bool:
        """True when starting one more item (as long as the longest so far) would overrun ``budget_s``."""
        if budget_s is None:
            return False
        expected = max(self.seconds) if self.seconds else 0.0
        return self._clock() - self._t0 + expected > budget_s


def run_items(
    items: Sequence[T],
    run_one: RunOne[T],
    *,
    label: Callable[[T], str] | None = None,
    progress: BatchProgressFn | None = None,
    catch: tuple[type[BaseException], ...] = (LpfmError, OSError, ValueError, RuntimeError, MemoryError),
    describe: Callable[[BaseException], str] | None = None,
    halt: Callable[[BaseException], str | None] | None = None,
    budget_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> list[Outcome]:
    """Run ``run_one`` on each item in turn and return one :class:`Outcome` per item, in order.

    Items are shown by ``label(item)`` (default: the item's ``label`` attribute, else its text).
    An exception of ``catch`` becomes a ``failed`` outcome (its text from ``describe``, default the
    exception's one line) and the next item runs; any other exception is a bug and propagates. ``halt(exc)``
    returning a reason (e.g. "the OMERO session was lost") marks every later item ``not run`` with it; so does
    ``budget_s`` when the next item would not finish in time. ``run_one`` sets the status; the seconds are
    measured here.
    """
    total = len(items)
    eta = EtaClock(total, clock)
    outcomes: list[Outcome] = []
    stop: str | None = None
    describe = describe or _one_line
    label = label or _label
    for index, item in enumerate(items):
        name = label(item)
        if stop is None and eta.over(budget_s):
            stop = "the time budget would be exceeded"
        if stop is not None:
            outcome = Outcome(name, Status.NOT_RUN, error=f"not run: {stop}")
        else:
            eta.start_item()
            if progress is not None:
                progress(BatchProgress(index, total, name, eta.finished, eta_s=eta.eta()))

            def tiles(done: int, tiles_total: int, _i: int = index, _name: str = name) -> None:
                if progress is not None:
                    progress(
                        BatchProgress(
                            _i,
                            total,
                            _name,
                            eta.finished,
                            done,
                            tiles_total,
                            eta.item_eta(done, tiles_total),
                            eta.eta(done, tiles_total),
                        )
                    )

            t0 = clock()
            try:
                outcome = run_one(item, tiles)
            except catch as exc:
                log.debug("%s failed", name, exc_info=True)
                outcome = Outcome(name, Status.FAILED, error=describe(exc))
                reason = halt(exc) if halt is not None else None
                if reason:
                    stop = reason
            outcome.seconds = outcome.seconds or round(clock() - t0, 3)
        eta.finish(outcome)
        outcomes.append(outcome)
        if progress is not None:
            progress(BatchProgress(index, total, name, eta.finished, eta_s=eta.eta(), outcome=outcome))
    return outcomes


def _label(item: Any) -> str:
    """An item's ``label`` if it has one, else its text."""
    return str(getattr(item, "label", item))


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, LpfmError):
        text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def exit_code(outcomes: Iterable[Outcome]) -> int:
    """0 when every item is done, skipped or had nothing to do; 1 when any failed or was not run.

    (2, bad input before any work, is the exit code of the :class:`LpfmError` raised before the batch starts.)
    """
    return EXIT_FAILED if any(o.status in INCOMPLETE for o in outcomes) else EXIT_OK


def counts(outcomes: Iterable[Outcome]) -> dict[Status, int]:
    """How many outcomes have each status, in :class:`Status` order, leaving out the absent ones."""
    listed = list(outcomes)
    return {s: n for s in Status if (n := sum(o.status is s for o in listed))}


def summary(outcomes: Iterable[Outcome]) -> str:
    """``3 done, 1 skipped, 1 failed`` (or ``nothing to do``)."""
    return ", ".join(f"{n} {s.value}" for s, n in counts(outcomes).items()) or "nothing to do"


#: the summary table's columns
COLUMNS = ("item", "status", "result", "time", "note")


def summary_rows(outcomes: Iterable[Outcome]) -> list[tuple[str, Status, str, str, str]]:
    """One row per outcome for the summary table: item, status, result, time, error."""
    return [
        (o.item, o.status, o.result or "", f"{o.seconds:.1f} s" if o.seconds else "", o.error or "") for o in outcomes
    ]


class KeptOpen(Generic[K, V]):
    """The one thing consecutive items share (an image and its sink), opened for the first item of a key and
    closed when an item of another key comes, or at :meth:`close`. A failed open is not kept: the next item of
    that key tries again (and fails on its own)."""

    def __init__(self, open_: Callable[[K], V], close: Callable[[V], None]) -> None:
        self._open, self._close = open_, close
        self._key: Any = None
        self._value: V | None = None
        self._held = False

    def get(self, key: K) -> V:
        if not self._held or key != self._key:
            self.close()
            self._value, self._key, self._held = self._open(key), key, True
        return self._value  # type: ignore[return-value]

    def close(self) -> None:
        value, held = self._value, self._held
        self._value, self._key, self._held = None, None, False
        if held:
            self._close(value)  # type: ignore[arg-type]

    def __enter__(self) -> KeptOpen[K, V]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
