"""Job store on a real SQLite file and a real PostgreSQL server: atomic claims, queue positions, cancel,
recovery, webhooks, retention. Every test runs on both backends (`db_url` is parametrized)."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from server.states import JobStatus
from server.store import Store


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
    assert job.status == JobStatus.QUEUED and job.extra == {"k": [1, 2]} and job.spec == {"prompt": "x"}
    assert [entry["message"] for entry in job.logs] == ["hello"]
    assert store.get_job("nope") is None


def test_failure_keeps_its_field_and_rule_as_data(store):
    jid = _job(store)
    store.claim_next("w1", lease_s=30)
    detail = [{"field": "video_url", "message": "could not be read", "type": "value_error"}]
    assert store.finish_job(jid, "w1", status=JobStatus.FAILED, error="input 'video_url': could not be read",
                            error_type="input_error", error_detail=detail)
    assert store.get_job(jid).error_detail == detail


def test_queue_positions_follow_priority_then_age(store):
    a, b, c = _job(store), _job(store), _job(store)
    urgent = _job(store, priority=-1)
    assert [store.queue_position(j) for j in (urgent, a, b, c)] == [0, 1, 2, 3]
    store.request_cancel(a)
    assert store.queue_position(a) is None
    assert [store.queue_position(j) for j in (urgent, b, c)] == [0, 1, 2]


def test_keys_take_turns_however_many_jobs_one_queued(store):
    """Key A queues 200 jobs, then key B one: B's job is claimed second (it was 201st in arrival order)."""
    a = [_job(store, owner="key-a") for _ in range(200)]
    b = _job(store, owner="key-b")
    assert store.queue_position(b) == 1
    assert [store.claim_next("w").id for _ in range(3)] == [a[0], b, a[1]]
    assert store.queue_position(a[2]) == 0


def test_queue_positions_are_the_fair_claim_order(store):
    """Each queued job's reported position is its place in the order the workers then claim them."""
    ids = [_job(store, owner=owner) for owner, n in (("a", 5), ("b", 2), (None, 2), ("c", 3)) for _ in range(n)]
    store.claim_next("w")  # a was served: a goes to the back of the round
    ids += [_job(store, owner="b"), _job(store, owner="d"), _job(store, owner="a", priority=-1)]
    positions = {j: store.queue_position(j) for j in ids if store.queue_position(j) is not None}
    assert sorted(positions.values()) == list(range(14))
    order = [store.claim_next("w").id for _ in positions]
    assert [positions[j] for j in order] == list(range(14))
    assert store.claim_next("w") is None


def test_per_key_cap_is_exact_under_concurrent_submits(db_url, store):
    from server.store import OwnerQueueFull

    def submit(owner: str) -> bool:
        s = Store(db_url)
        try:
            _job(s, owner=owner, owner_cap=5)
            return True
        except OwnerQueueFull as e:
            assert e.cap == 5
            return False
        finally:
            s.dispose()

    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(submit("a"))) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == [False] * 11 + [True] * 5
    assert submit("b") and submit(None)  # another key, and jobs made without keys, are not affected
    store.claim_next("w")  # a's first job runs: one queued slot frees up
    assert submit("a") and not submit("a")
    with store.engine.connect() as c:
        queued_a = c.execute(sa.text("SELECT count(*) FROM jobs WHERE owner = 'a' AND status = 'queued'")).scalar()
    assert queued_a == 5


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
            s.finish_job(job.id, f"w{n}", status=JobStatus.SUCCEEDED, outputs=[])
        s.dispose()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    got = [j for j, _ in claimed]
    assert sorted(got) == sorted(ids), "every job claimed exactly once"
    assert setup.count_by_status()[JobStatus.SUCCEEDED] == 30


def test_only_the_owning_worker_can_finish(store):
    jid = _job(store)
    job = store.claim_next("w1")
    assert job.id == jid and job.status == JobStatus.RUNNING and job.attempts == 1
    assert not store.finish_job(jid, "w2", status=JobStatus.FAILED, error="stale")
    assert store.finish_job(jid, "w1", status=JobStatus.SUCCEEDED, outputs=[{"file": "o.mp4"}], timings={"total": 1.0})
    job = store.get_job(jid)
    assert job.status == JobStatus.SUCCEEDED and job.progress == 1.0 and job.outputs == [{"file": "o.mp4"}]


def test_cancel_queued_is_immediate_running_is_flagged(store):
    queued, running = _job(store), _job(store)
    store.claim_next("w1")  # claims `queued` (oldest)
    assert store.get_job(queued).status == JobStatus.RUNNING
    assert store.request_cancel(running) == JobStatus.CANCELLED
    assert store.request_cancel(queued) == JobStatus.RUNNING
    assert store.cancel_requested(queued)
    assert store.request_cancel("missing") is None


def test_recovery_requeues_once_then_fails(store):
    jid = _job(store)
    job = store.claim_next("w1")
    assert store.recover_job(job, "the worker process died (killed by signal SIGKILL)",
                             max_attempts=2) == JobStatus.QUEUED
    job = store.claim_next("w2")
    assert job.id == jid and job.attempts == 2
    assert store.recover_job(job, "the worker process died", max_attempts=2) == JobStatus.FAILED
    job = store.get_job(jid, with_logs=True)
    assert job.status == JobStatus.FAILED and "worker process died" in job.error and job.error_type == "worker_died"
    assert any("re-queued" in entry["message"] for entry in job.logs)
    # a stale view (wrong attempt count) changes nothing
    assert store.recover_job(job, "again", max_attempts=5) is None


def test_release_does_not_spend_an_attempt(store):
    jid = _job(store)
    job = store.claim_next("w1")
    assert store.release_job(job, "server shutting down")
    again = store.get_job(jid)
    assert again.status == JobStatus.QUEUED and again.attempts == 0


def test_webhook_state_machine(store):
    jid = _job(store, webhook_url="https://example.com/hook")
    plain = _job(store)
    store.claim_next("w")
    store.claim_next("w")
    store.finish_job(jid, "w", status=JobStatus.SUCCEEDED, outputs=[])
    store.finish_job(plain, "w", status=JobStatus.SUCCEEDED, outputs=[])
    due = store.due_webhooks(time.time() + 1)
    assert [j.id for j in due] == [jid]
    store.webhook_attempted(jid, delivered=False, attempts=1, next_at=time.time() + 100)
    assert store.due_webhooks(time.time() + 1) == []
    store.webhook_attempted(jid, delivered=True, attempts=2, next_at=None, log_line="webhook delivered (HTTP 200)")
    job = store.get_job(jid, with_logs=True)
    assert job.webhook_status == "delivered" and job.webhook_attempts == 2
    assert job.logs[-1]["message"] == "webhook delivered (HTTP 200)"  # written with the attempt, not after it


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
    store.finish_job(old, "w", status=JobStatus.SUCCEEDED, outputs=[])
    store.finish_job(new, "w", status=JobStatus.SUCCEEDED, outputs=[])
    with store.engine.begin() as c:
        from server.store import jobs

        c.execute(jobs.update().where(jobs.c.id == old).values(finished_at=time.time() - 7200))
    expired = store.expired_jobs(time.time() - 3600)
    assert expired == [old]
    store.delete_jobs(expired)
    assert store.get_job(old) is None and store.get_job(new) and store.get_job(queued)


# ---- schema versions, leases and several instances on one store ------------------------------------------

DATA = Path(__file__).parent / "store_schemas"


def _create_old_schema(url: str) -> None:
    """The tables exactly as the previous release's create_all made them (tests/store_schemas/store_schema_v1.*.sql)."""
    engine = sa.create_engine(url)
    sql = (DATA / f"store_schema_v1.{engine.dialect.name}.sql").read_text()
    body = "\n".join(line for line in sql.splitlines() if not line.startswith("--"))
    with engine.begin() as c:
        for stmt in filter(str.strip, body.split(";")):
            c.exec_driver_sql(stmt)
        c.exec_driver_sql(
            "INSERT INTO jobs (id, dialect, model, spec, extra, status, priority, step, total, progress, outputs,"
            " timings, created_at, updated_at, attempts, worker_id, heartbeat_at, cancel_requested,"
            " webhook_attempts) VALUES ('old-run', 'wavespeed', 'm', '{\"prompt\": \"x\"}', '{}', 'running', 0,"
            " 3, 10, 0.4, '[]', '{}', 1.0, 1.0, 1, 'w0-old', 1.0, false, 0)")
    engine.dispose()


def test_old_schema_upgrades_in_place(db_url):
    from server.migrations import LATEST, current_version

    _create_old_schema(db_url)
    s = Store(db_url)
    assert current_version(s.engine) is None
    s.create_all()
    assert current_version(s.engine) == LATEST
    old = s.get_job("old-run")
    assert old.status == JobStatus.RUNNING and old.step == 3
    assert old.lease_expires_at is None and old.error_detail is None
    # a job claimed before leases existed is recovered by its heartbeat age
    assert [j.id for j in s.expired_leases(time.time(), legacy_timeout_s=60)] == ["old-run"]
    assert s.recover_job(old, "its worker stopped heart-beating", max_attempts=2) == JobStatus.QUEUED
    job = s.claim_next("w1", lease_s=30)
    assert job.id == "old-run" and job.attempts == 2 and job.lease_expires_at > time.time() + 25
    s.create_all()  # idempotent: opening it again applies nothing
    assert current_version(s.engine) == LATEST
    s.dispose()


def test_fresh_store_is_stamped_latest(store):
    from server.migrations import LATEST, current_version, upgrade
    from server.store import metadata

    assert current_version(store.engine) == LATEST
    assert upgrade(store.engine, metadata) == []


def test_lease_is_renewed_by_heartbeat_and_expires_without_it(store):
    jid = _job(store)
    job = store.claim_next("w1", lease_s=0.5)
    assert job.lease_expires_at == pytest.approx(time.time() + 0.5, abs=0.3)
    store.worker_heartbeat("w1", jid, lease_s=30)
    assert store.expired_leases(time.time() + 5, legacy_timeout_s=60) == []
    assert store.get_job(jid).lease_expires_at > time.time() + 25
    store.worker_heartbeat("w2", jid, lease_s=1000)  # not its worker: renews nothing
    assert store.get_job(jid).lease_expires_at < time.time() + 31
    [expired] = store.expired_leases(time.time() + 31, legacy_timeout_s=60)
    assert expired.id == jid
    assert store.recover_job(expired, "the lease expired", max_attempts=2) == JobStatus.QUEUED
    assert store.get_job(jid).lease_expires_at is None
    again = store.claim_next("w2", lease_s=30)
    assert again.id == jid
    store.worker_heartbeat("w1", jid, lease_s=1000)  # the old worker, back from a pause, cannot take it back
    assert not store.finish_job(jid, "w1", status=JobStatus.SUCCEEDED, outputs=[])
    assert store.finish_job(jid, "w2", status=JobStatus.SUCCEEDED, outputs=[])


def test_instances_see_only_their_own_jobs_and_workers(store):
    for wid, inst in (("a-w0", "box-a"), ("b-w0", "box-b")):
        store.upsert_worker(wid, slot=0, instance=inst, pid=1, device="cpu", status="busy")
    a, b = _job(store), _job(store)
    assert store.claim_next("a-w0").id == a and store.claim_next("b-w0").id == b
    assert [j.id for j in store.running_jobs_of_instance("box-a")] == [a]
    store.delete_workers_of("box-a")
    assert [w["instance"] for w in store.list_workers()] == ["box-b"]


def test_a_webhook_is_claimed_by_exactly_one_instance(db_url, store):
    ids = [_job(store, webhook_url="https://example.com/hook") for _ in range(20)]
    for jid in ids:
        store.claim_next("w")
        store.finish_job(jid, "w", status=JobStatus.SUCCEEDED, outputs=[])
    wins: list[str] = []
    lock = threading.Lock()

    def instance() -> None:
        s = Store(db_url)
        for job in s.due_webhooks(time.time() + 1, limit=100):
            if s.claim_webhook(job, time.time() + 60):
                with lock:
                    wins.append(job.id)
        s.dispose()

    threads = [threading.Thread(target=instance) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(wins) == sorted(ids), "each webhook claimed exactly once"
    assert store.due_webhooks(time.time() + 1) == []


def test_singleton_work_runs_on_one_instance_at_a_time(db_url, store):
    other = Store(db_url)
    try:
        with store.singleton("retention") as first:
            with other.singleton("retention") as second:
                assert first
                assert second is (not store.is_postgres)  # SQLite: one server per store, always its turn
        with other.singleton("retention") as after:
            assert after
    finally:
        other.dispose()


# ---- the transition table ---------------------------------------------------------------------------------

_PRIORITY = itertools.count()


def _job_in(store: Store, status: str, **kw) -> str:
    """A new job brought to `status` through the public methods, as the server does. Each one has a lower
    priority number than any before it, so the claim takes this job and no older queued one."""
    jid = _job(store, priority=-next(_PRIORITY), **kw)
    if status == JobStatus.CANCELLED:
        assert store.request_cancel(jid) == JobStatus.CANCELLED
    elif status != JobStatus.QUEUED:
        assert store.claim_next("w").id == jid
        if status != JobStatus.RUNNING:
            assert store.finish_job(jid, "w", status=status, outputs=[])
    assert store.get_job(jid).status == status
    return jid


def test_the_transition_table_refuses_illegal_moves(store):
    from server.states import TRANSITIONS, IllegalTransition, JobStatus
    from server.store import _transition

    illegal = [(a, b) for a in JobStatus for b in JobStatus if b not in TRANSITIONS[a]]
    assert (JobStatus.SUCCEEDED, JobStatus.RUNNING) in illegal and (JobStatus.CANCELLED, JobStatus.SUCCEEDED) in illegal
    assert (JobStatus.FAILED, JobStatus.QUEUED) in illegal
    assert len(illegal) == 25 - 6  # queued → running | cancelled; running → the 3 final statuses | queued
    for frm, to in illegal:
        jid = _job_in(store, frm)
        before = store.get_job(jid)
        with pytest.raises(IllegalTransition, match=f"a {frm} job cannot become {to}"), store.engine.begin() as c:
            _transition(c, jid, to, from_=frm)
        assert store.get_job(jid) == before, (frm, to)
    # the public methods cannot move a finished job either, and a finish must be final
    done, cancelled, running = (_job_in(store, s)
                                for s in (JobStatus.SUCCEEDED, JobStatus.CANCELLED, JobStatus.RUNNING))
    before = {j: store.get_job(j) for j in (done, cancelled)}
    assert not store.finish_job(done, "w", status=JobStatus.FAILED, error="late")
    assert not store.finish_job(cancelled, None, status=JobStatus.SUCCEEDED, outputs=[])
    assert store.request_cancel(done) == JobStatus.SUCCEEDED
    assert store.recover_job(before[cancelled], "gone", max_attempts=5) is None
    assert not store.release_job(before[done], "shutting down")
    assert {j: store.get_job(j) for j in (done, cancelled)} == before
    for not_final in (JobStatus.QUEUED, JobStatus.RUNNING):
        with pytest.raises(IllegalTransition, match="terminal"):
            store.finish_job(running, "w", status=not_final)
    assert store.get_job(running).status == JobStatus.RUNNING


def test_every_move_to_a_final_status_makes_the_webhook_due(store):
    """Each path that ends a job stamps finished_at and makes its webhook due (when it has one); the moves that
    do not end it leave both alone. Together the paths take every move the table allows."""
    from server.states import TRANSITIONS

    def recover(jid: str, max_attempts: int, *, cancel: bool = False) -> None:
        if cancel:
            store.request_cancel(jid)  # running: only flagged
        assert store.recover_job(store.get_job(jid), "worker died", max_attempts=max_attempts)

    paths = {  # name: (status the job starts in, the move)
        "claim": (JobStatus.QUEUED, lambda jid: store.claim_next("w")),
        "cancel while queued": (JobStatus.QUEUED, lambda jid: store.request_cancel(jid)),
        "succeed": (JobStatus.RUNNING, lambda jid: store.finish_job(jid, "w", status=JobStatus.SUCCEEDED, outputs=[])),
        "fail": (JobStatus.RUNNING,
                 lambda jid: store.finish_job(jid, "w", status=JobStatus.FAILED, error="x", error_type="x")),
        "cancelled by its worker": (JobStatus.RUNNING,
                                    lambda jid: store.finish_job(jid, "w", status=JobStatus.CANCELLED)),
        "recovered for a retry": (JobStatus.RUNNING, lambda jid: recover(jid, 2)),
        "recovered, out of attempts": (JobStatus.RUNNING, lambda jid: recover(jid, 1)),
        "recovered, cancel requested": (JobStatus.RUNNING, lambda jid: recover(jid, 2, cancel=True)),
        "released on shutdown": (JobStatus.RUNNING, lambda jid: store.release_job(store.get_job(jid), "shutting down")),
    }
    taken: set[tuple[str, str]] = set()
    due: set[str] = set()
    for hook in ("https://example.com/hook", None):
        for name, (start, move) in paths.items():
            jid = _job_in(store, start, webhook_url=hook)
            move(jid)
            job = store.get_job(jid)
            taken.add((start, job.status))
            if job.terminal:
                assert job.finished_at is not None and job.webhook_next_at is not None, name
                assert job.webhook_status == ("pending" if hook else None), (name, hook)
                if hook:
                    due.add(jid)
            else:
                assert job.finished_at is None and job.webhook_status is None, name
    assert taken == {(a, b) for a, targets in TRANSITIONS.items() for b in targets}
    assert {j.id for j in store.due_webhooks(time.time() + 1, limit=100)} == due and len(due) == 6


def test_job_pages_follow_creation_order_per_dialect_and_owner(store):
    made = [store.insert_job(dialect="openai", model="m", spec={"prompt": f"p{i}"}, owner="alice" if i % 2 else None)
            for i in range(5)]
    store.insert_job(dialect="fal", model="m", spec={"prompt": "other"})
    ids = [j.id for j in sorted(made, key=lambda j: (j.created_at, j.id))]
    page, more = store.page_jobs("openai", after=None, limit=2, ascending=True)
    assert [j.id for j in page] == ids[:2] and more
    page, more = store.page_jobs("openai", after=page[-1].id, limit=10, ascending=True)
    assert [j.id for j in page] == ids[2:] and not more
    newest_first, _ = store.page_jobs("openai", after=None, limit=10, ascending=False)
    assert [j.id for j in newest_first] == ids[::-1]
    bob, _ = store.page_jobs("openai", after=None, limit=10, ascending=True, owner="bob")
    keyless = {j.id for j in made if j.owner is None}
    assert [j.id for j in bob] == [i for i in ids if i in keyless]  # only the jobs made without keys
    assert store.page_jobs("openai", after="no-such-job", limit=10, ascending=True) is None
    assert store.page_jobs("fal", after=ids[0], limit=10, ascending=True) is None  # another dialect's id
