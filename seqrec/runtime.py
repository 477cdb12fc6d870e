"""Process set-up shared by every job: logging and connecting to (or starting) Ray."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

from seqrec.logs import quiet_ray_driver, quiet_ray_environment

_QUIET_ENV = quiet_ray_environment(os.environ.get("SEQREC_RAY_VERBOSE") == "1")  # before `import ray`

import ray  # noqa: E402

from seqrec.storage import s3_endpoint  # noqa: E402

log = logging.getLogger("seqrec")


@contextlib.contextmanager
def timed(timings: dict[str, float], stage: str):
    """Log the start of ``stage`` and record its wall seconds in ``timings``."""
    started = time.perf_counter()
    log.info("== %s ==", stage)
    yield
    timings[stage] = round(time.perf_counter() - started, 2)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    quiet_third_party_loggers()


def quiet_third_party_loggers() -> None:
    """Libraries' loggers at WARNING, even under -v: their DEBUG lines are noise, and botocore's
    request dumps carry signed headers (the access key id)."""
    for noisy in ("urllib3", "botocore", "s3fs", "fsspec", "filelock", "matplotlib", "tensorboardX"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def worker_setup() -> None:
    """Ray worker_process_setup_hook of the local Ray: name this Ray to Ray's own clients in workers.

    Ray Train's PlacementGroupCleaner queries the state API without an address; on a host with more
    than one Ray (CI: the test session's and a job's) that fails with "Found multiple active Ray
    instances" and kills its monitor thread with a traceback.
    """
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def init_ray(address: str | None = None, num_cpus: int | None = None, state_api: bool = False) -> None:
    """Join the cluster named by ``address`` / ``RAY_ADDRESS`` (``ray job submit`` sets it), else start
    a local single-node Ray sized to this machine.

    ``state_api``: the local Ray also runs the dashboard, which serves Ray's state API. Ray Train's
    PlacementGroupCleaner asks it whether a run's controller is alive, and only then frees the CPUs
    of a run whose controller died without shutting down: a ``seqrec tune`` trial cut by ASHA. Without
    it every cut trial kept its worker's CPUs until the search stalled. A night does not need it (its
    runs shut down; the local Ray ends with the process) and saves the dashboard's start-up and
    memory. A cluster runs its own dashboard.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    quiet_ray_driver()
    # Non-secret settings workers need; credentials stay with each node's AWS chain, never in job metadata.
    env = {
        k: v
        for k, v in {
            "AWS_ENDPOINT_URL": s3_endpoint(),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            **_QUIET_ENV,
        }.items()
        if v
    }
    if address:
        # A cluster (or `ray job submit`) defines the runtime environment: the job's working_dir and
        # env vars come from the submission; a runtime_env here would replace the job's.
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=state_api,
            log_to_driver=True,
            runtime_env={"env_vars": env, "worker_process_setup_hook": "seqrec.runtime.worker_setup"},
        )
    resources = ray.cluster_resources()
    log.info(
        "ray: %s, %d CPUs, %d GPUs",
        "cluster " + address if address else "local single node",
        int(resources.get("CPU", 0)),
        int(resources.get("GPU", 0)),
    )
    configure_ray_data()


def configure_ray_data(progress: bool | None = None) -> None:
    """Ray Data settings of a process whose datasets seqrec runs: the driver, or a tune trial.

    Progress bars only where someone watches (``progress`` default: stderr is a terminal, or
    SEQREC_PROGRESS=1); elsewhere they are thousands of lines of log. A dataset takes the settings of
    the process that creates it, so a tune trial sets its own (off: Tune prints the trials' table).
    """
    from ray import data as ray_data

    if progress is None:
        progress = sys.stderr.isatty() or os.environ.get("SEQREC_PROGRESS") == "1"
    ray_data.DataContext.get_current().enable_progress_bars = progress
