"""Jobs and schedules: a SQLite job store, runners for a local pool or a Dask/Slurm cluster, and watchers.

``JobStore`` keeps one row per work item (keyed by the pipeline's idempotency key); ``add_jobs`` queues
:class:`JobSpec` s; ``run_queued`` runs them on a :class:`LocalRunner` or :class:`DaskRunner`;
``watch_folder`` / ``watch_qupath`` find new work. Importing this package imports no torch and no dask.
"""

from lpfm_toolkit.jobs.runners import (
    DaskRunner,
    LocalRunner,
    RunSummary,
    SlurmOptions,
    Terminated,
    clean_store_scratch,
    dask_runner,
    run_queued,
    sigterm_interrupts,
    slurm_kwargs,
    slurm_runner,
)
from lpfm_toolkit.jobs.spec import JobResult, JobSpec, compute, execute, finalize, job_key, prepare
from lpfm_toolkit.jobs.store import (
    DEFAULT_STORE,
    DONE,
    FAILED,
    QUEUED,
    RUNNING,
    STATES,
    Job,
    JobStore,
    NewJob,
    StoreError,
)
from lpfm_toolkit.jobs.watch import (
    FLAG_KEY,
    SLIDE_EXTENSIONS,
    AddReport,
    add_jobs,
    qupath_specs,
    scan_folder,
    watch_folder,
    watch_qupath,
)

__all__ = [
    "DEFAULT_STORE", "DONE", "FAILED", "FLAG_KEY", "QUEUED", "RUNNING", "SLIDE_EXTENSIONS", "STATES",
    "AddReport", "DaskRunner", "Job", "JobResult", "JobSpec", "JobStore", "LocalRunner", "NewJob", "RunSummary",
    "SlurmOptions", "StoreError", "Terminated", "add_jobs", "clean_store_scratch", "sigterm_interrupts", "compute", "dask_runner", "execute", "finalize", "job_key", "prepare", "qupath_specs",
    "run_queued", "scan_folder", "slurm_kwargs", "slurm_runner", "watch_folder", "watch_qupath",
]
