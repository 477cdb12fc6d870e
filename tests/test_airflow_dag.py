"""examples/airflow/seqrec_nightly.py: the DAG submits each night once, for its own date.

Airflow is not a seqrec dependency (it is heavy and its own scheduler's business), so the DAG is
checked by parsing the file, and its submission logic runs here against an in-memory job server
that behaves as Ray's JobSubmissionClient does (unique submission ids, statuses, logs).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

DAG_FILE = Path(__file__).resolve().parents[1] / "examples" / "airflow" / "seqrec_nightly.py"


def _tree() -> ast.Module:
    return ast.parse(DAG_FILE.read_text())


def _call(tree: ast.Module, name: str) -> ast.Call:
    (call,) = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == name]
    return call


def _kwargs(call: ast.Call) -> dict:
    return {k.arg: k.value for k in call.keywords}


def test_dag_runs_nightly_one_at_a_time_with_retries():
    dag = _kwargs(_call(_tree(), "DAG"))
    assert ast.literal_eval(dag["dag_id"]) == "seqrec_nightly"
    assert len(ast.literal_eval(dag["schedule"]).split()) == 5
    assert ast.literal_eval(dag["max_active_runs"]) == 1
    defaults = {ast.literal_eval(k): v for k, v in zip(dag["default_args"].keys, dag["default_args"].values)}
    assert ast.literal_eval(defaults["retries"]) >= 1


def test_task_passes_the_runs_date():
    task = _kwargs(_call(_tree(), "PythonOperator"))
    assert task["python_callable"].id == "submit_night"
    op_kwargs = ast.literal_eval(task["op_kwargs"])
    assert op_kwargs["date"] == "{{ ds }}"
    assert "execution_timeout" in task


@dataclass
class Job:
    submission_id: str
    entrypoint: str
    status: str = "RUNNING"
    start_time: int = 0


class FakeJobServer:
    """Ray's job server as far as the DAG uses it; a job finishes after ``polls`` status queries."""

    def __init__(self, outcome: str = "SUCCEEDED", polls: int = 1):
        self.jobs: dict[str, Job] = {}
        self.outcome, self.polls = outcome, polls

    def list_jobs(self):
        return list(self.jobs.values())

    def submit_job(self, *, submission_id, entrypoint, runtime_env):
        if submission_id in self.jobs:
            raise RuntimeError(f"Job with submission_id {submission_id} already exists")
        self.jobs[submission_id] = Job(submission_id, entrypoint, start_time=len(self.jobs))
        return submission_id

    def get_job_status(self, submission_id):
        job = self.jobs[submission_id]
        self.polls -= 1
        if self.polls <= 0 and job.status == "RUNNING":
            job.status = self.outcome
        return job.status

    def get_job_logs(self, submission_id):
        return "seqrec: error: no events for 2024-01-07"


@pytest.fixture(scope="module")
def submit_night():
    """The DAG file's functions, without Airflow: every top-level def, compiled on its own."""
    tree = _tree()
    body = [
        n
        for n in tree.body
        if isinstance(n, (ast.FunctionDef, ast.Import, ast.ImportFrom))
        and not (isinstance(n, ast.ImportFrom) and (n.module or "").startswith("airflow"))
    ]
    body += [n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "ACTIVE"]
    namespace: dict = {}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(DAG_FILE), "exec"), namespace)
    return namespace["submit_night"]


def test_first_attempt_submits_the_night_under_its_id(submit_night):
    server = FakeJobServer()
    assert submit_night("2024-01-07", "", "s3://b/p", poll_s=0, client=server) == "seqrec-nightly-2024-01-07"
    (job,) = server.jobs.values()
    assert job.entrypoint == "python -m seqrec nightly --root s3://b/p --date 2024-01-07"


def test_retry_waits_on_the_running_night_instead_of_resubmitting(submit_night):
    server = FakeJobServer(polls=3)
    server.jobs["seqrec-nightly-2024-01-07"] = Job("seqrec-nightly-2024-01-07", "...")  # the lost attempt
    assert submit_night("2024-01-07", "", "r", poll_s=0, client=server) == "seqrec-nightly-2024-01-07"
    assert len(server.jobs) == 1


def test_retry_after_success_does_nothing(submit_night):
    server = FakeJobServer()
    server.jobs["seqrec-nightly-2024-01-07"] = Job("seqrec-nightly-2024-01-07", "...", status="SUCCEEDED")
    assert submit_night("2024-01-07", "", "r", poll_s=0, client=server) == "seqrec-nightly-2024-01-07"
    assert len(server.jobs) == 1


def test_retry_after_failure_resubmits_under_a_new_id_and_a_failure_names_the_cause(submit_night):
    server = FakeJobServer(outcome="FAILED")
    with pytest.raises(RuntimeError, match="(?s)seqrec-nightly-2024-01-07 ended FAILED.*no events"):
        submit_night("2024-01-07", "", "r", poll_s=0, client=server)
    server.outcome = "SUCCEEDED"
    server.polls = 1
    assert submit_night("2024-01-07", "", "r", poll_s=0, client=server) == "seqrec-nightly-2024-01-07-2"
    assert sorted(server.jobs) == ["seqrec-nightly-2024-01-07", "seqrec-nightly-2024-01-07-2"]
    # Another night is untouched by this one's attempts.
    assert submit_night("2024-01-08", "", "r", poll_s=0, client=server) == "seqrec-nightly-2024-01-08"
