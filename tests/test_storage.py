"""Storage backends against real servers: the data dir, and S3 on a real S3-compatible server process (moto's
standalone server on loopback). Then two live instances with separate data dirs on one PostgreSQL and one
bucket: an upload made on one box is the input of a job that the other box's worker runs, and the output is
served by the box that never had it (streamed, and as a presigned redirect).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server.storage import LocalStorage, S3Storage, key_of_path

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "vace-test"
S3_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """moto's standalone S3 server in its own process; the bucket is made through the S3 API."""
    pytest.importorskip("boto3")
    if shutil.which("moto_server", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("moto[server] is not installed (pip install 'moto[server]')")
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            httpx.get(url, timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.2)
    os.environ.update(S3_ENV)
    import boto3

    boto3.client("s3", endpoint_url=url).create_bucket(Bucket=BUCKET)
    yield url
    proc.kill()
    proc.wait(10)


@pytest.fixture(params=["local", "s3"])
def two_boxes(request, tmp_path):
    """Two processes' views of one storage: the same directory (local) or one bucket with separate caches."""
    if request.param == "local":
        return LocalStorage(tmp_path / "shared"), LocalStorage(tmp_path / "shared")
    url = request.getfixturevalue("s3_endpoint")
    return (S3Storage(tmp_path / "a", bucket=BUCKET, prefix="t1", endpoint_url=url),
            S3Storage(tmp_path / "b", bucket=BUCKET, prefix="t1", endpoint_url=url))


def test_written_once_readable_everywhere_deleted_everywhere(two_boxes):
    a, b = two_boxes
    key = "outputs/job1/output.mp4"
    a.local(key).parent.mkdir(parents=True, exist_ok=True)
    a.local(key).write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"x" * 5000)
    a.publish(key)
    assert b.fetch("outputs/job1/missing.mp4") is None
    got = b.fetch(key)
    assert got is not None and got.read_bytes() == a.local(key).read_bytes() and got.is_relative_to(b.root)
    if b.remote:
        assert b.stat(key) == (5012, "video/mp4")
        assert b"".join(b.stream(key, chunk=1000)) == got.read_bytes()
        r = httpx.get(b.presigned_url(key, 60), timeout=10)
        assert r.status_code == 200 and r.content == got.read_bytes()
    a.delete_prefix("outputs/job1")
    assert not a.local(key).exists() and b.stat(key) is None  # gone for everyone (b's cached copy aside)
    if b.remote:
        old = time.time() - 7200
        os.utime(b.local(key).parent, (old, old))
        assert b.sweep_local(time.time() - 3600) == 1  # each box drops its own expired copies
    assert b.fetch(key) is None


def test_key_of_path_takes_only_data_dir_files():
    assert key_of_path(Path("/srv/box-a/uploads/u1/test.jpg")) == "uploads/u1/test.jpg"
    assert key_of_path(Path("/etc/passwd")) is None
    assert key_of_path(Path("/srv/cache/models/x.bin")) is None


def test_two_boxes_separate_data_dirs_one_bucket(pg_cluster, s3_endpoint, tmp_path, fixtures_dir):
    from server.store import Store
    from tests.test_server_live import AUTH, LiveServer

    db_url = pg_cluster.create_database()
    common = {"VACE_DATABASE_URL": db_url, "VACE_STORAGE": "s3", "VACE_S3_BUCKET": BUCKET, "VACE_S3_PREFIX": "live",
              "VACE_S3_ENDPOINT_URL": s3_endpoint, **S3_ENV}
    api_only = LiveServer(tmp_path / "box-a", tmp_path / "cache", workers="0",
                          extra_env={**common, "VACE_INSTANCE_ID": "box-a", "VACE_FILE_DELIVERY": "redirect"})
    gpu_box = LiveServer(tmp_path / "box-b", tmp_path / "cache", workers="1",
                         extra_env={**common, "VACE_INSTANCE_ID": "box-b"})
    store = Store(db_url)
    try:
        api_only.start(60)
        gpu_box.start()
        with open(fixtures_dir / "vace" / "test.jpg", "rb") as f:
            r = httpx.post(f"{api_only.base}/api/v3/media/upload/binary", files={"file": ("test.jpg", f)},
                           headers=AUTH, timeout=30)
        assert r.status_code == 200, r.text
        upload_url = r.json()["data"]["download_url"]
        jid = api_only.submit({"prompt": "from box a", "images": [upload_url], "num_inference_steps": 2})["id"]
        deadline = time.time() + 120
        while not (job := store.get_job(jid)).terminal and time.time() < deadline:
            time.sleep(0.3)
        assert job.status == "succeeded", (job.status, job.error)
        assert not (tmp_path / "box-a" / "outputs" / jid).exists()  # box a never had the output…
        name = job.outputs[0]["file"]
        streamed = httpx.get(f"{gpu_box.base}/files/outputs/{jid}/{name}", headers=AUTH, timeout=30)
        redirect = httpx.get(f"{api_only.base}/files/outputs/{jid}/{name}", headers=AUTH, timeout=30)
        assert redirect.status_code == 307 and redirect.headers["location"].startswith(s3_endpoint)
        via_presigned = httpx.get(redirect.headers["location"], timeout=30)
        assert streamed.status_code == 200 and streamed.content[4:8] == b"ftyp"
        assert via_presigned.status_code == 200 and via_presigned.content == streamed.content  # …yet serves it
        for r in (streamed, via_presigned):  # typed by sniffing the bytes, on the box and in the presigned URL
            assert r.headers["content-type"] == "video/mp4", r.headers
        assert streamed.headers["x-content-type-options"] == "nosniff"
        # the input crossed boxes through the bucket: box b's copy is in box b's data dir
        assert any((tmp_path / "box-b" / "uploads").rglob("test.jpg"))
        assert httpx.get(f"{api_only.base}/files/outputs/{jid}/nope.mp4", headers=AUTH, timeout=10).status_code == 404
        # the capability URL one box hands out (no key needed) is served by the other box too: one store-wide key
        url_a = httpx.get(f"{api_only.base}/api/v3/predictions/{jid}/result", headers=AUTH,
                          timeout=10).json()["data"]["outputs"][0]
        cross = httpx.get(url_a.replace(api_only.base, gpu_box.base), timeout=30)
        assert cross.status_code == 200 and cross.content == streamed.content
    finally:
        api_only.stop()
        gpu_box.stop()
        store.dispose()
