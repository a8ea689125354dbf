"""Job store on a real SQLite file and a real PostgreSQL server: atomic claims, queue positions, cancel,
recovery, webhooks, retention. Every test runs on both backends (`db_url` is parametrized)."""

from __future__ import annotations

import threading
import time

import pytest

from server.store import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, Store


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """A fresh, empty database: a SQLite file, or a new database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return request.getfixturevalue("pg_cluster").create_database()


@pytest.fixture
def store(db_url):
    s = Store(db_url)
    s.create_all()
    yield s
    s.dispose()


def _job(store: Store, **kw) -> str:
    return store.insert_job(dialect="wavespeed", model="m", spec={"prompt": "x"}, **kw).id


def test_wal_mode_and_roundtrip(store):
    if store.engine.dialect.name == "sqlite":
        with store.engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    jid = _job(store, extra={"k": [1, 2]}, logs=["hello"])
    job = store.get_job(jid, with_logs=True)
    assert job.status == QUEUED and job.extra == {"k": [1, 2]} and job.spec == {"prompt": "x"}
    assert [entry["message"] for entry in job.logs] == ["hello"]
    assert store.get_job("nope") is None


def test_queue_positions_follow_priority_then_age(store):
    a, b, c = _job(store), _job(store), _job(store)
    urgent = _job(store, priority=-1)
    assert [store.queue_position(j) for j in (urgent, a, b, c)] == [0, 1, 2, 3]
    store.request_cancel(a)
    assert store.queue_position(a) is None
    assert [store.queue_position(j) for j in (urgent, b, c)] == [0, 1, 2]


def test_concurrent_claims_never_double_claim(db_url):
    url = db_url
    setup = Store(url)
    setup.create_all()
    ids = {_job(setup) for _ in range(30)}
    claimed: list[tuple[str, str]] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        s = Store(url)  # one engine per "process", like the real workers
        while (job := s.claim_next(f"w{n}")) is not None:
            with lock:
                claimed.append((job.id, f"w{n}"))
            s.finish_job(job.id, f"w{n}", status=SUCCEEDED, outputs=[])
        s.dispose()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    got = [j for j, _ in claimed]
    assert sorted(got) == sorted(ids), "every job claimed exactly once"
    assert setup.count_by_status()[SUCCEEDED] == 30


def test_only_the_owning_worker_can_finish(store):
    jid = _job(store)
    job = store.claim_next("w1")
    assert job.id == jid and job.status == RUNNING and job.attempts == 1
    assert not store.finish_job(jid, "w2", status=FAILED, error="stale")
    assert store.finish_job(jid, "w1", status=SUCCEEDED, outputs=[{"file": "o.mp4"}], timings={"total": 1.0})
    job = store.get_job(jid)
    assert job.status == SUCCEEDED and job.progress == 1.0 and job.outputs == [{"file": "o.mp4"}]


def test_cancel_queued_is_immediate_running_is_flagged(store):
    queued, running = _job(store), _job(store)
    store.claim_next("w1")  # claims `queued` (oldest)
    assert store.get_job(queued).status == RUNNING
    assert store.request_cancel(running) == CANCELLED
    assert store.request_cancel(queued) == RUNNING
    assert store.cancel_requested(queued)
    assert store.request_cancel("missing") is None


def test_recovery_requeues_once_then_fails(store):
    jid = _job(store)
    job = store.claim_next("w1")
    assert store.recover_job(job, "the worker process died (killed by signal SIGKILL)", max_attempts=2) == QUEUED
    job = store.claim_next("w2")
    assert job.id == jid and job.attempts == 2
    assert store.recover_job(job, "the worker process died", max_attempts=2) == FAILED
    job = store.get_job(jid, with_logs=True)
    assert job.status == FAILED and "worker process died" in job.error and job.error_type == "worker_died"
    assert any("re-queued" in entry["message"] for entry in job.logs)
    # a stale view (wrong attempt count) changes nothing
    assert store.recover_job(job, "again", max_attempts=5) is None


def test_release_does_not_spend_an_attempt(store):
    jid = _job(store)
    job = store.claim_next("w1")
    assert store.release_job(job, "server shutting down")
    again = store.get_job(jid)
    assert again.status == QUEUED and again.attempts == 0


def test_webhook_state_machine(store):
    jid = _job(store, webhook_url="https://example.com/hook")
    plain = _job(store)
    store.claim_next("w")
    store.claim_next("w")
    store.finish_job(jid, "w", status=SUCCEEDED, outputs=[])
    store.finish_job(plain, "w", status=SUCCEEDED, outputs=[])
    due = store.due_webhooks(time.time() + 1)
    assert [j.id for j in due] == [jid]
    store.webhook_attempted(jid, delivered=False, attempts=1, next_at=time.time() + 100)
    assert store.due_webhooks(time.time() + 1) == []
    store.webhook_attempted(jid, delivered=True, attempts=2, next_at=None)
    assert store.get_job(jid).webhook_status == "delivered"


def test_stage_histograms_accumulate_per_slot(store):
    store.observe_stages(0, {"generate": 3.0, "encode": 0.2})
    store.observe_stages(0, {"generate": 40.0})
    store.observe_stages(1, {"generate": 0.05})
    h = store.stage_histograms()
    assert h["generate"]["count"] == 3 and h["generate"]["total"] == pytest.approx(43.05)
    assert h["generate"]["buckets"][0] == 1  # 0.05 ≤ 0.1
    assert h["generate"]["buckets"][-1] == 3
    assert h["encode"]["count"] == 1


def test_retention_selects_only_old_finished_jobs(store):
    old, new, queued = _job(store), _job(store), _job(store)
    store.claim_next("w")
    store.claim_next("w")
    store.finish_job(old, "w", status=SUCCEEDED, outputs=[])
    store.finish_job(new, "w", status=SUCCEEDED, outputs=[])
    with store.engine.begin() as c:
        from server.store import jobs

        c.execute(jobs.update().where(jobs.c.id == old).values(finished_at=time.time() - 7200))
    expired = store.expired_jobs(time.time() - 3600)
    assert expired == [old]
    store.delete_jobs(expired)
    assert store.get_job(old) is None and store.get_job(new) and store.get_job(queued)
