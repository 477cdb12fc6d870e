"""Airflow DAG: one seqrec night per day, submitted to a standing Ray cluster's job server.

Each run submits ``seqrec nightly`` for its own date (``{{ ds }}``) under the submission id
``seqrec-nightly-<ds>``. A retry never starts a second copy of a night: it first asks the job
server about that night's submissions and waits on one that is pending or running, returns if one
succeeded, and resubmits (``seqrec-nightly-<ds>-2``, ``-3``, ...) only after a failure, which is
safe because a night replaces its partitions whole. ``max_active_runs=1`` keeps nights in order.

Copy this file into the DAGs folder; set the Airflow Variables ``seqrec_ray_address``
(``http://ray-head:8265``) and ``seqrec_root`` (``s3://bucket/prefix``). The workers need
``ray[default]`` for the job client only. tests/test_airflow_dag.py checks this file.
"""

from __future__ import annotations

import datetime as dt
import time

from airflow.providers.standard.operators.python import PythonOperator  # Airflow 3
from airflow.sdk import DAG

ACTIVE = ("PENDING", "RUNNING")


def night_submissions(client, date: str) -> list:
    """This night's submissions, oldest first."""
    prefix = f"seqrec-nightly-{date}"
    jobs = [
        j
        for j in client.list_jobs()
        if j.submission_id == prefix or (j.submission_id or "").startswith(prefix + "-")
    ]
    return sorted(jobs, key=lambda j: j.start_time or 0)


def wait_for(client, submission_id: str, poll_s: float) -> None:
    while (status := str(client.get_job_status(submission_id)).rsplit(".", 1)[-1]) in ACTIVE:
        time.sleep(poll_s)
    if status != "SUCCEEDED":
        logs = client.get_job_logs(submission_id)[-3000:]
        raise RuntimeError(f"{submission_id} ended {status}; the end of its log:\n{logs}")


def submit_night(date: str, address: str, root: str, poll_s: float = 30.0, client=None) -> str:
    """Run (or finish waiting for) the night ``date``; returns the submission id that succeeded."""
    if client is None:
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(address)
    earlier = night_submissions(client, date)
    for job in earlier:
        status = str(job.status).rsplit(".", 1)[-1]
        if status in ACTIVE or status == "SUCCEEDED":
            wait_for(client, job.submission_id, poll_s)  # a retry joins the attempt already under way
            return job.submission_id
    submission_id = f"seqrec-nightly-{date}" + (f"-{len(earlier) + 1}" if earlier else "")
    client.submit_job(
        submission_id=submission_id,
        entrypoint=f"python -m seqrec nightly --root {root} --date {date}",
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}},
    )
    wait_for(client, submission_id, poll_s)
    return submission_id


with DAG(
    dag_id="seqrec_nightly",
    schedule="30 2 * * *",  # 02:30 UTC, for the day that just ended ({{ ds }})
    start_date=dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": dt.timedelta(minutes=10)},
    tags=["seqrec"],
) as dag:
    PythonOperator(
        task_id="nightly",
        python_callable=submit_night,
        op_kwargs={
            "date": "{{ ds }}",
            "address": "{{ var.value.seqrec_ray_address }}",
            "root": "{{ var.value.seqrec_root }}",
        },
        execution_timeout=dt.timedelta(hours=4),
    )
