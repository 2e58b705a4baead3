"""Run queued jobs on a local process pool or a Dask cluster; the store stays in this (coordinating) process.

:func:`run_queued` claims jobs as workers free up, sends each spec to the runner, and records what comes
back. Workers only compute (:func:`lpfm_toolkit.jobs.spec.run_job`); the coordinator writes the store and
does the follow-up (QuPath entries), so a cluster never needs the SQLite file. A heartbeat thread renews the
leases of the jobs this process holds; if it dies, another runner requeues them when the lease runs out.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lpfm_toolkit.errors import ConfigError, ConnectionFailedError, require
from lpfm_toolkit.jobs.scratch import clean_scratch, defer
from lpfm_toolkit.jobs.spec import JobResult, configure_threads, failed_for_good, finalize, run_job
from lpfm_toolkit.jobs.store import FAILED, Job, JobStore, one_line_error, worker_id

log = logging.getLogger(__name__)

#: on_event(event, job, detail): event is start · done · skipped · retry · failed; detail a URI or an error line
EventFn = Callable[[str, Job, str], None]


class Runner(Protocol):
    """Somewhere jobs run: ``submit`` a spec, ``wait`` for some to finish, ``close`` (``abort``: stop them now)."""

    @property
    def capacity(self) -> int: ...

    def submit(self, spec: dict[str, Any]) -> Any: ...

    def wait(self, futures: Iterable[Any], timeout: float) -> set[Any]: ...

    def close(self, abort: bool = False) -> None: ...


class Terminated(KeyboardInterrupt):
    """The runner was asked to stop (SIGTERM); handled like Ctrl-C: jobs in flight go back to the queue."""


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While inside, SIGTERM (systemd, Slurm, ``kill``) raises :class:`Terminated` in the main thread.

    The first signal interrupts; further ones are ignored while the jobs are handed back and the workers
    stopped. Outside the main thread this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        exc = Terminated(f"signal {signal.Signals(signum).name}")
        if not defer(exc):  # deferred while a scratch folder is being made and marked
            raise exc

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


# -- pool workers: stop cleanly on SIGTERM, and when the coordinator disappears --------------------------------
class _WorkerStopped(BaseException):
    """Raised in a pool worker's job when it is told to stop: the job's writer removes its scratch folder."""


_in_job = threading.Event()


def _pool_worker_init(threads: int | None, coordinator: int) -> None:
    """Initialise a pool worker: math threads, SIGTERM → stop, Ctrl-C left to the coordinator, orphan watch."""
    configure_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator decides; it stops us with SIGTERM

    def on_term(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if not _in_job.is_set():
            os._exit(128 + signal.SIGTERM)
        exc = _WorkerStopped()  # unwinds the job: its writer aborts and removes its scratch folder
        if not defer(exc):
            raise exc

    signal.signal(signal.SIGTERM, on_term)

    def orphan_watch() -> None:  # the coordinator was killed (kill -9): stop instead of writing on
        while os.getppid() == coordinator:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30.0)  # the job did not unwind in time (a long C call): give up
        os._exit(1)

    threading.Thread(target=orphan_watch, name="lpfm-orphan-watch", daemon=True).start()


def _pool_job(spec: dict[str, Any], threads: int | None) -> tuple[str, Any]:
    """:func:`run_job` in a pool worker; a worker told to stop exits once its job has unwound."""
    _in_job.set()
    try:
        with array_friendly_malloc():  # a pool started where MALLOC_TRIM_THRESHOLD_ is set (e.g. after a
            return run_job(spec, threads)  # LocalCluster in this process: distributed leaves it in os.environ)
    except _WorkerStopped:
        _clean_own_scratch([spec])  # a writer the stop caught before its `with` began has no abort to run
        os._exit(128 + signal.SIGTERM)
    finally:
        _in_job.clear()


def _clean_own_scratch(specs: Iterable[dict[str, Any]]) -> None:
    """Remove this process's scratch folders in the output folders of ``specs`` (its jobs have stopped)."""
    from lpfm_toolkit.jobs.spec import JobSpec, output_dir

    for spec in specs:
        with contextlib.suppress(Exception):
            folder = output_dir(JobSpec.from_dict(spec))
            if folder is not None:
                clean_scratch(folder, own=True)


def free_cores() -> int:
    """Cores this process may use (its CPU affinity where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


class LocalRunner:
    """``workers`` processes on this machine (spawned, each capped at ``cores // workers`` math threads).

    ``workers=1`` runs each job in this process, one after another. Workers ignore Ctrl-C (the coordinator
    stops them), unwind their job on SIGTERM, and stop by themselves when the coordinator dies.
    """

    grace_s = 20.0  # how long an aborted worker may take to unwind its job before it is killed

    def __init__(self, workers: int = 1, threads: int | None = None) -> None:
        if workers < 1:
            raise ConfigError(f"--workers {workers} must be at least 1")
        self.workers = workers
        self.threads = threads if threads is not None else max(1, free_cores() // workers)
        self._pool: cf.ProcessPoolExecutor | None = None

    @property
    def capacity(self) -> int:
        return self.workers

    def _new_pool(self) -> cf.ProcessPoolExecutor:

        # spawn, not fork: this process may hold torch threads and open files a fork would copy half-made
        return cf.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                      initializer=_pool_worker_init, initargs=(self.threads, os.getpid()))

    def submit(self, spec: dict[str, Any]) -> cf.Future:
        if self.workers == 1:
            fut: cf.Future = cf.Future()
            fut.set_result(run_job(spec, None))  # in-process: leave the thread settings of this process alone
            return fut
        if self._pool is None:
            self._pool = self._new_pool()
        try:
            return self._pool.submit(_pool_job, spec, self.threads)
        except cf.process.BrokenProcessPool:  # a worker was killed (out of memory?): start a fresh pool
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
            return self._pool.submit(_pool_job, spec, self.threads)

    def wait(self, futures: Iterable[Any], timeout: float) -> set[Any]:
        return set(cf.wait(list(futures), timeout=timeout, return_when=cf.FIRST_COMPLETED).done)

    def worker_pids(self) -> list[int]:
        """Process ids of the pool's workers (none before the first job, or with ``workers=1``)."""
        procs = getattr(self._pool, "_processes", None) or {}
        return [p.pid for p in procs.values() if p.pid is not None]

    def close(self, abort: bool = False) -> None:
        """Shut the pool down; ``abort``: stop running jobs now (SIGTERM, then SIGKILL after ``grace_s``)."""
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        if not abort:
            pool.shutdown(wait=True, cancel_futures=True)
            return
        procs = list((getattr(pool, "_processes", None) or {}).values())
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.terminate()  # SIGTERM: the job unwinds and its writer removes its scratch folder
        deadline = time.monotonic() + self.grace_s
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        pool.shutdown(wait=False, cancel_futures=True)


# -- Dask workers: the same memory allocator behaviour and math threads as a pool worker ---------------------
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_malloc_lock = threading.Lock()
_malloc_users = 0


def _libc() -> Any:
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # musl and others: no glibc tuning
        return None


@contextlib.contextmanager
def array_friendly_malloc() -> Iterator[None]:
    """Keep freed memory in the process while a job runs; give it back to the OS afterwards.

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which turns off glibc's adaptive
    mmap threshold: every large temporary array is then a fresh ``mmap`` whose pages fault in zeroed, and
    freeing it unmaps them again. A Richardson-Lucy job ran 2-3x slower that way than in a pool worker. In a
    process started with that variable (any value: glibc's adaptive behaviour is off then), large blocks are
    reused inside this block (mmap threshold 32 MiB, trim threshold 256 MiB); when the last job of
    the process leaves it, the worker's settings come back and ``malloc_trim`` returns the free memory, which
    is what the nanny's setting is for.
    """
    global _malloc_users
    libc = _libc() if os.environ.get("MALLOC_TRIM_THRESHOLD_") else None  # glibc left alone: nothing to undo
    if libc is None:
        yield
        return
    with _malloc_lock:
        _malloc_users += 1
        if _malloc_users == 1:
            libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
            libc.mallopt(_M_TRIM_THRESHOLD, 256 * 1024 * 1024)
    try:
        yield
    finally:
        with _malloc_lock:
            _malloc_users -= 1
            if _malloc_users == 0:
                trim = os.environ.get("MALLOC_TRIM_THRESHOLD_", "")
                libc.mallopt(_M_TRIM_THRESHOLD, int(trim) if trim.isdigit() else 128 * 1024 * 1024)
                libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
                libc.malloc_trim(0)


_thread_share: dict[str, tuple[int, float]] = {}  # worker address → (threads, valid until)


def _dask_threads() -> int | None:
    """Math threads for one job on this Dask worker: this host's cores shared among its Dask worker threads.

    ``threads`` in the worker's settings (``LPFM_THREADS`` in its environment, or its settings file) wins;
    outside a worker (or when the scheduler does not answer) None, i.e. leave the process's settings alone.
    The share is asked of the scheduler once a minute.
    """
    from lpfm_toolkit.config import load_settings

    try:
        configured = load_settings().threads
    except Exception:  # noqa: BLE001 - a broken settings file on a worker: the job's own check reports it
        configured = None
    if configured:
        return int(configured)
    try:
        from distributed import get_worker

        worker = get_worker()
    except Exception:  # noqa: BLE001 - not on a worker (or no dask): keep the process's settings
        return None
    cached = _thread_share.get(worker.address)
    if cached is not None and time.monotonic() < cached[1]:
        return cached[0]
    try:
        host = worker.address.rsplit(":", 1)[0]
        info = worker.client.scheduler_info()["workers"]
        slots = sum(int(w.get("nthreads", 1)) for addr, w in info.items() if addr.rsplit(":", 1)[0] == host)
    except Exception:  # noqa: BLE001 - the scheduler did not answer: keep the process's settings
        return None
    share = max(1, free_cores() // max(1, slots))
    _thread_share[worker.address] = (share, time.monotonic() + 60.0)
    return share


def dask_job(spec: dict[str, Any], threads: int | None = None) -> tuple[str, Any]:
    """:func:`run_job` as a Dask task: math threads as a pool worker would get them, allocator tuned for arrays."""
    with array_friendly_malloc():
        return run_job(spec, threads if threads is not None else _dask_threads())


class DaskRunner:
    """Jobs as tasks on a ``dask.distributed`` cluster.

    ``resources``: Dask worker resources each job needs (``{"lpfm": 1}`` on clusters whose workers declare
    them, so one job runs per worker and uses all its cores); ``threads``: math threads per job (None: each
    worker host's cores divided among its worker threads, or ``LPFM_THREADS`` where the worker sets it).
    ``cluster``: a cluster object to close with the runner (the Slurm cluster this process started).
    """

    def __init__(self, client: Any, *, resources: dict[str, float] | None = None, threads: int | None = None,
                 cluster: Any = None, min_capacity: int = 1) -> None:
        self.client = client
        self.resources = resources
        self.threads = threads
        self.cluster = cluster
        self.min_capacity = min_capacity
        self._submitted: list[Any] = []

    @property
    def capacity(self) -> int:
        """Jobs kept in flight: one per worker thread (or per worker with resources), at least ``min_capacity``."""
        try:
            info = self.client.scheduler_info()["workers"].values()
            n = sum(1 for _ in info) if self.resources else sum(int(w.get("nthreads", 1)) for w in info)
        except Exception:  # noqa: BLE001 - a scheduler that does not answer: keep the floor
            n = 0
        return max(self.min_capacity, n)

    def submit(self, spec: dict[str, Any]) -> Any:
        fut = self.client.submit(dask_job, spec, self.threads, pure=False, resources=self.resources)
        self._submitted = [f for f in self._submitted if not f.done()] + [fut]
        return fut

    def wait(self, futures: Iterable[Any], timeout: float) -> set[Any]:
        from distributed import wait

        futures = list(futures)
        with contextlib.suppress(TimeoutError):
            wait(futures, timeout=timeout, return_when="FIRST_COMPLETED")
        return {f for f in futures if f.done()}

    def close(self, abort: bool = False) -> None:
        """Close the client (and the cluster this runner started); ``abort`` cancels tasks not yet finished."""
        if abort:
            with contextlib.suppress(Exception):
                self.client.cancel(list(self._submitted), force=True)
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def dask_runner(address: str, *, threads: int | None = None, timeout_s: float = 10.0) -> DaskRunner:
    """A :class:`DaskRunner` on the scheduler at ``address`` (``tcp://host:8786``)."""
    require("distributed", "dask", "running jobs on a Dask cluster")
    from distributed import Client

    try:
        client = Client(address, timeout=f"{timeout_s}s")
    except (OSError, TimeoutError) as exc:
        raise ConnectionFailedError(f"no Dask scheduler answered at {address} ({exc})",
                                    "start one (dask scheduler) or check --dask-scheduler") from exc
    return DaskRunner(client, threads=threads)


@dataclass(frozen=True)
class SlurmOptions:
    """A Slurm cluster of Dask workers, one per Slurm job (``dask_jobqueue.SLURMCluster``)."""

    jobs: int = 1  # Slurm jobs (= Dask workers) to start
    cores: int = 4  # CPU cores per Slurm job
    memory: str = "16GB"  # memory per Slurm job
    walltime: str = "04:00:00"
    queue: str | None = None  # the Slurm partition
    account: str | None = None
    gpus: int = 0  # --gres=gpu:N per Slurm job
    job_extra: tuple[str, ...] = ()  # more #SBATCH directives, e.g. "--qos=normal"
    local_directory: str | None = None  # scratch space on the compute nodes
    python: str | None = None  # the Python on the compute nodes (default: this one)
    interface: str | None = None  # network interface the compute nodes reach this host on (e.g. ib0)


def slurm_kwargs(opts: SlurmOptions) -> dict[str, Any]:
    """``SLURMCluster`` keyword arguments for ``opts``: one worker process per job, one lpfm job at a time."""
    if opts.jobs < 1 or opts.cores < 1:
        raise ConfigError("--slurm-jobs and --slurm-cores must be at least 1")
    extra = list(opts.job_extra) + ([f"--gres=gpu:{opts.gpus}"] if opts.gpus else [])
    kwargs: dict[str, Any] = {"cores": opts.cores, "processes": 1, "memory": opts.memory, "walltime": opts.walltime,
                              "job_extra_directives": extra, "worker_extra_args": ["--resources", "lpfm=1"],
                              "job_name": "lpfm-jobs"}
    for name in ("queue", "account", "local_directory", "python", "interface"):
        if getattr(opts, name):
            kwargs[name] = getattr(opts, name)
    return kwargs


def slurm_runner(opts: SlurmOptions) -> DaskRunner:
    """Start a Slurm cluster (``opts.jobs`` Slurm jobs) and a :class:`DaskRunner` on it."""
    jobqueue = require("dask_jobqueue", "dask", "running jobs on Slurm")
    from distributed import Client

    cluster = jobqueue.SLURMCluster(**slurm_kwargs(opts))
    cluster.scale(jobs=opts.jobs)
    log.info("Slurm job script:\n%s", cluster.job_script())
    return DaskRunner(Client(cluster), resources={"lpfm": 1}, threads=opts.cores, cluster=cluster,
                      min_capacity=opts.jobs)


@dataclass
class RunSummary:
    """What one :func:`run_queued` call did."""

    done: int = 0
    skipped: int = 0  # done, but the output already existed
    retried: int = 0  # failed attempts that went back to the queue
    failed: int = 0  # jobs that used their last attempt (here, or in a runner that died)
    remade: int = 0  # done jobs whose earlier output failed its check and was made again
    requeued: list[str] = field(default_factory=list)  # keys found abandoned by a dead runner

    @property
    def finished(self) -> int:
        return self.done + self.skipped + self.failed


def _requeue_stale(store: JobStore, max_attempts: int, summary: RunSummary, emit: EventFn) -> None:
    """Requeue the jobs of dead runners; those that used their last attempt count as failed in this run."""
    failed: list[str] = []
    for key in store.requeue_stale(max_attempts, failed=failed):
        if key in failed:
            summary.failed += 1
            job = store.get(key)
            if job is not None:
                _follow_up_failure(job, job.last_error or "")
                emit("failed", job, job.last_error or "")
        else:
            summary.requeued.append(key)
            log.warning("job %s was abandoned by a stopped runner: queued again", key[:12])


def clean_store_scratch(store: JobStore, *, own: bool = False) -> list[Path]:
    """Remove scratch folders left by dead writers in the output folders of the store's jobs.

    ``own``: this process's too (after its runner was stopped, when no job of it is still writing).
    """
    from lpfm_toolkit.jobs.spec import JobSpec, output_dir

    folders: set[Path] = set()
    for spec in store.specs():
        with contextlib.suppress(Exception):  # a spec this version cannot read has no folder to clean
            folder = output_dir(JobSpec.from_dict(spec))
            if folder is not None:
                folders.add(folder)
    removed: list[Path] = []
    for folder in sorted(folders):
        removed += clean_scratch(folder, own=own)
    return removed


def _heartbeat(store: JobStore, worker: str, lease_s: float, max_attempts: int, stop: threading.Event,
               summary: RunSummary, emit: EventFn) -> None:
    """Renew this runner's leases; requeue jobs of runners that died meanwhile."""
    while not stop.wait(min(30.0, lease_s / 3)):
        try:
            store.renew(worker, lease_s)
            _requeue_stale(store, max_attempts, summary, emit)
        except Exception:  # noqa: BLE001 - a missed renewal is retried; the lease has slack
            log.warning("could not renew job leases", exc_info=True)


def run_queued(store: JobStore, runner: Runner, *, max_attempts: int = 3, lease_s: float = 600.0,
               limit: int | None = None, worker: str | None = None, on_event: EventFn | None = None,
               poll_s: float = 1.0, verify: str = "quick") -> RunSummary:
    """Run queued jobs on ``runner`` until none are left (or ``limit`` have started); returns what happened.

    Jobs abandoned by dead runners are requeued first. A job that fails is queued again until it has used
    ``max_attempts`` attempts, then stays ``failed`` until :meth:`JobStore.retry`. Interrupting this call
    (Ctrl-C, or SIGTERM inside :func:`sigterm_interrupts`) hands the jobs in flight back to the queue.
    ``verify``: how an existing output is checked before a job counts as already done (``quick``, ``full``).
    """
    if max_attempts < 1:
        raise ConfigError(f"--max-attempts {max_attempts} must be at least 1")
    worker = worker or worker_id()
    emit = on_event or (lambda event, job, detail: None)
    summary = RunSummary()
    _requeue_stale(store, max_attempts, summary, emit)
    clean_store_scratch(store)
    in_flight: dict[Any, Job] = {}
    held: set[str] = set()
    started = 0
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(store, worker, lease_s, max_attempts, stop, summary, emit),
                            name="lpfm-jobs-lease", daemon=True)
    beat.start()
    try:
        while True:
            free = runner.capacity - len(in_flight)
            if limit is not None:
                free = min(free, limit - started)
            if free > 0:
                for job in store.claim(worker, free, lease_s):
                    held.add(job.key)
                    emit("start", job, "")
                    spec = job.spec if verify == "quick" else {**job.spec, "verify": verify}
                    in_flight[runner.submit(spec)] = job  # in-process runners run it right here
                    started += 1
            if not in_flight:
                break
            for fut in runner.wait(list(in_flight), poll_s):
                job = in_flight.pop(fut)
                _record(store, worker, job, fut, max_attempts, summary, emit)
                held.discard(job.key)
    finally:
        stop.set()
        if held:  # claimed but not finished (Ctrl-C, an error here): back to the queue, attempt not counted
            store.release(sorted(held), worker, "interrupted: the runner stopped")
            for fut in in_flight:
                with contextlib.suppress(Exception):
                    fut.cancel()
    return summary


def _follow_up_failure(job: Job, error: str) -> None:
    """The source's follow-up of a job that failed for good (OMERO marks the original); never raises."""
    try:
        failed_for_good(job.spec, error)
    except Exception as exc:  # noqa: BLE001 - the job's failure is recorded; the marking is a courtesy
        log.warning("job %s failed, and marking its source failed did not work either: %s", job.key[:12],
                    one_line_error(exc))


def _record(store: JobStore, worker: str, job: Job, fut: Any, max_attempts: int, summary: RunSummary,
            emit: EventFn) -> None:
    """Write one finished future's outcome to the store."""
    try:
        status, payload = fut.result()
    except Exception as exc:  # noqa: BLE001 - the worker itself died (killed, out of memory, lost)
        status, payload = "error", one_line_error(f"worker lost: {type(exc).__name__}: {exc}")
    if status == "ok":
        result: JobResult = payload
        try:
            uri = finalize(job.spec, result)
        except Exception as exc:  # noqa: BLE001 - recorded as this job's failure
            status, payload = "error", one_line_error(exc)
        else:
            if not store.complete(job.key, worker, uri):
                log.warning("job %s finished after its lease ran out; it may run again (and find this result)",
                            job.key[:12])
            summary.skipped += result.skipped
            summary.done += not result.skipped
            summary.remade += bool(getattr(result, "remade", None))
            detail = uri + (f" (made again: the earlier output {result.remade})" if getattr(result, "remade", None)
                            else "")
            emit("skipped" if result.skipped else "done", job, detail)
            return
    state = store.fail(job.key, worker, payload, max_attempts)
    if state == FAILED:
        summary.failed += 1
        _follow_up_failure(job, payload)
        emit("failed", job, payload)
    else:
        summary.retried += 1
        emit("retry", job, payload)


__all__ = ["DaskRunner", "LocalRunner", "RunSummary", "Runner", "SlurmOptions", "Terminated", "clean_store_scratch",
           "dask_runner", "run_queued", "sigterm_interrupts", "slurm_kwargs", "slurm_runner"]
