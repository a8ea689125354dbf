"""The state vocabularies: stored values unchanged, and worker exit codes that survive a real child process."""

from __future__ import annotations

import json
import multiprocessing as mp
import sys

from server.states import WORKER_LOADED, JobStatus, WebhookStatus, WorkerExit, WorkerStatus
from server.supervisor import _describe_exit


def test_statuses_keep_the_strings_the_store_has_always_written():
    assert [s.value for s in JobStatus] == ["queued", "running", "succeeded", "failed", "cancelled"]
    assert [s for s in JobStatus if s.is_terminal] == ["succeeded", "failed", "cancelled"]
    assert JobStatus.RUNNING == "running" and json.dumps({"s": JobStatus.FAILED}) == '{"s": "failed"}'
    assert f"{JobStatus.CANCELLED}: x" == "cancelled: x"
    assert [s.value for s in WebhookStatus] == ["pending", "delivered", "failed"]
    assert {s.value for s in WorkerStatus} >= WORKER_LOADED == {"ready", "busy"}


def test_a_worker_exit_code_reaches_the_supervisor_with_its_reason():
    ctx = mp.get_context("spawn")  # as the supervisor starts workers
    for code in WorkerExit:
        p = ctx.Process(target=sys.exit, args=(code,))
        p.start()
        p.join(30)
        assert p.exitcode == int(code) and _describe_exit(p.exitcode) == code.reason
    assert _describe_exit(WorkerExit.RESTART) == "restart after GPU out-of-memory"
    assert _describe_exit(9) == "exit code 9" and _describe_exit(-9) == "killed by signal SIGKILL"
