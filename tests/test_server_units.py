"""Input safety rules, settings parsing and the torch-free API process (no model, no workers)."""

from __future__ import annotations

import base64
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from server import media_refs
from server.settings import Settings
from vace_local.core.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
MP4 = b"\x00\x00\x00\x18ftypisom" + b"\x00" * 64


def test_api_process_never_imports_torch_nor_decodes_media(tmp_path):
    """The API process imports no torch and decodes no media: fal's `auto` sizing probes the video in the
    sandbox child (`vace_local.core.sandbox`), so neither decord, cv2 nor PIL's decoders load here and no ffmpeg
    runs from this process."""
    from vace_local.core.media import write_video

    frames = np.zeros((9, 48, 80, 3), np.uint8)
    clip = base64.b64encode(write_video(frames, tmp_path / "clip.mp4", fps=8).read_bytes()).decode()
    code = (
        "import subprocess, sys\n"
        "started = []\n"
        "_init = subprocess.Popen.__init__\n"
        "def spy(self, args, *a, **k):\n"
        "    started.append([str(x) for x in args])\n"
        "    _init(self, args, *a, **k)\n"
        "subprocess.Popen.__init__ = spy\n"
        "from server.settings import Settings\n"
        "from server.app import create_app\n"
        "from fastapi.testclient import TestClient\n"
        f"app = create_app(Settings(data_dir={str(tmp_path)!r}, workers='0', model='tiny'))\n"
        "with TestClient(app) as c:\n"
        "    r = c.post('/api/v3/wavespeed-ai/wan-2.1-14b-vace', json={'prompt': 'x'})\n"
        "    assert r.status_code == 200, r.text\n"
        f"    r = c.post('/fal-ai/wan-vace-14b', json={{'prompt': 'x', 'video_url': 'data:video/mp4;base64,{clip}'}})\n"
        "    assert r.status_code == 200, r.text\n"
        "    job = app.state.services.jobs.get_sync(r.json()['request_id'])\n"
        "    assert job.spec['width'] > job.spec['height'], job.spec  # the probe saw the 80x48 clip\n"
        "    c.get('/metrics'); c.get('/ready')\n"
        "for mod in ('torch', 'decord', 'cv2', 'PIL.Image', 'imageio_ffmpeg'):\n"
        "    assert mod not in sys.modules, f'{mod} was imported by the API process'\n"
        "assert any('vace_local.core.media_vet' in a for a in started), started  # the probe ran, in the sandbox\n"
        "assert not [a for a in started if 'ffmpeg' in a[0]], started\n"
        "print('OK')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]


def test_settings_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("VACE_API_KEYS", "alpha, beta")
    monkeypatch.setenv("VACE_ALLOWED_HOSTS", "10.0.0.0/8,files.internal")
    monkeypatch.setenv("VACE_PUBLIC_BASE_URL", "https://gpu.example.com/")
    s = Settings(data_dir=tmp_path)
    assert s.api_keys == ["alpha", "beta"] and s.allowed_hosts == ["10.0.0.0/8", "files.internal"]
    assert s.public_base_url == "https://gpu.example.com"
    assert s.db_url.startswith("sqlite:///") and s.db_url.endswith("jobs.db")
    with pytest.raises(ValueError, match="workers"):
        Settings(workers="many")


@pytest.mark.parametrize("head,kind", [
    (PNG, "image"), (b"\xff\xd8\xff\xe0" + b"\x00" * 20, "image"), (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "image"),
    (MP4, "video"), (b"\x1a\x45\xdf\xa3" + b"\x00" * 20 + b"webm", "video"), (b"RIFF\x00\x00\x00\x00AVI LIST", "video"),
    (b"hello world, not media", None), (b"\x00\x00\x00\x18ftypheic", None),
])
def test_sniff(head, kind):
    assert media_refs.kind_of(media_refs.sniff(head)) == kind


def test_animated_gif_is_accepted_as_video_and_as_image():
    gif = b"GIF89a" + b"\x00" * 20
    assert media_refs.check_content(gif, "video", "video") == "gif"
    assert media_refs.check_content(gif, "images[0]", "image") == "gif"
    with pytest.raises(InputError, match="must be a video"):
        media_refs.check_content(PNG, "video", "video")


def test_real_fixtures_sniff():
    fx = ROOT.parent / "shared" / "fixtures" / "vace"
    if not fx.is_dir():
        pytest.skip("../shared/fixtures absent")
    assert media_refs.check_file(fx / "test.mp4", "video", "video") == "mp4"
    assert media_refs.check_file(fx / "test.jpg", "images[0]", "image") == "jpeg"
    with pytest.raises(InputError, match="must be a video, but the content is a JPEG image"):
        media_refs.check_file(fx / "test.jpg", "video", "video")


@pytest.mark.parametrize("host,refused", [
    ("127.0.0.1", True), ("localhost", True), ("10.1.2.3", True), ("192.168.0.1", True), ("169.254.169.254", True),
    ("[::1]", True), ("::ffff:127.0.0.1", True), ("0.0.0.0", True), ("8.8.8.8", False), ("example.com", False),
    # numeric spellings that getaddrinfo/inet_aton accept, and the FQDN form of localhost
    ("2130706433", True), ("0x7f000001", True), ("0177.0.0.1", True), ("127.1", True), ("0", True),
    ("10.1", True), ("0xa9.254.169.254", True), ("localhost.", True), ("134744072", False), ("1e100.net", False),
])
def test_literal_hosts(host, refused):
    assert (media_refs.literal_host_problem(host, []) is not None) == refused


def test_allow_list_by_name_ip_and_cidr():
    assert media_refs.literal_host_problem("127.0.0.1", ["127.0.0.1"]) is None
    assert media_refs.literal_host_problem("10.9.8.7", ["10.0.0.0/8"]) is None
    assert media_refs.literal_host_problem("10.9.8.7", ["192.168.0.0/16"]) is not None
    media_refs.check_host("localhost", 80, "video", ["localhost"])  # allowed by name
    media_refs.check_host("localhost", 80, "video", ["127.0.0.0/8", "::1/128"])  # allowed by resolved address
    with pytest.raises(InputError, match="video: URL host 'localhost'"):
        media_refs.check_host("localhost", 80, "video", [])


@pytest.mark.parametrize("path", [
    "/files/uploads/../../etc/passwd", "/files/uploads/%2e%2e/%2e%2e/jobs.db", "/files/uploads/abc/x.png",
    "/files/secrets/0123456789abcdef0123456789abcdef/x.png", "/files/uploads/0123456789abcdef0123456789abcdef/..",
    "/files/uploads/0123456789abcdef0123456789abcdef/a%2fb.png", "/files/uploads/0123456789abcdef0123456789abcdef/.env",
])
def test_file_url_traversal_refused(path):
    with pytest.raises(InputError, match="path traversal refused"):
        media_refs.parse_file_url_path(path, "video")


def test_safe_data_path_stays_inside(tmp_path):
    ok = media_refs.safe_data_path(tmp_path, "outputs", "0123456789abcdef0123456789abcdef", "output.mp4")
    assert ok.is_relative_to(tmp_path.resolve())
    for bad in [("outputs", "..", "jobs.db"), ("outputs", "0123456789abcdef0123456789abcdef", "../x"),
                ("work", "0123456789abcdef0123456789abcdef", "x")]:
        with pytest.raises(ValueError):
            media_refs.safe_data_path(tmp_path, *bad)


def test_data_uris():
    good = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert media_refs.decode_data_uri(good, "images[0]", 1000) == PNG
    with pytest.raises(InputError, match="images\\[0\\]: malformed data URI"):
        media_refs.decode_data_uri("data:nonsense", "images[0]", 1000)
    with pytest.raises(InputError, match="not valid base64"):
        media_refs.decode_data_uri("data:image/png;base64,@@@@", "video", 1000)
    with pytest.raises(InputError, match="larger than"):
        media_refs.decode_data_uri("data:image/png;base64," + "A" * 4000, "video", 1000)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        if self.path == "/big":
            body = MP4 + b"\x00" * 5000
        elif self.path == "/redirect-private":
            self.send_response(302)
            self.send_header("Location", "http://10.0.0.1/x.mp4")
            self.end_headers()
            return
        elif self.path == "/missing":
            self.send_response(404)
            self.end_headers()
            return
        else:
            body = MP4
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):  # quiet
        pass


@pytest.fixture(scope="module")
def file_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_download_rules(file_server, tmp_path):
    allow = ["127.0.0.1"]
    p = media_refs.download(f"{file_server}/ok.mp4", tmp_path / "a", "video", allowed=allow, max_bytes=10_000,
                        timeout_s=10)
    assert media_refs.check_file(p, "video", "video") == "mp4"
    with pytest.raises(InputError, match="video: URL host '127.0.0.1' is not allowed: it resolves to a loopback"):
        media_refs.download(f"{file_server}/ok.mp4", tmp_path / "b", "video", allowed=[], max_bytes=10_000,
                        timeout_s=10)
    with pytest.raises(InputError, match="over the 1000 byte limit"):
        media_refs.download(f"{file_server}/big", tmp_path / "c", "video", allowed=allow, max_bytes=1000, timeout_s=10)
    with pytest.raises(InputError, match="URL host '10.0.0.1'"):
        media_refs.download(f"{file_server}/redirect-private", tmp_path / "d", "video", allowed=allow,
                        max_bytes=10_000, timeout_s=10)
    with pytest.raises(InputError, match="HTTP 404"):
        media_refs.download(f"{file_server}/missing", tmp_path / "e", "mask_video", allowed=allow, max_bytes=10_000,
                        timeout_s=10)
    assert not os.path.exists(tmp_path / "c") or os.path.getsize(tmp_path / "c") <= 1000


def test_one_exception_mapper():
    from pydantic import BaseModel, ValidationError

    from server.errors import map_exception
    from vace_local.core.errors import JobCancelled, ModelNotFoundError, OutOfMemory

    fields = {"reference_images": "images"}
    f = map_exception(InputError("reference_images[2]", "cannot decode image"), fields)
    assert (f.status, f.error_type) == ("failed", "input_error")
    assert f.message == "input 'images[2]': cannot decode image"
    assert map_exception(JobCancelled("x")).status == "cancelled"
    oom = map_exception(OutOfMemory("GPU out of memory at 1280x720x81"))
    assert oom.error_type == "out_of_memory" and oom.restart_worker and "worker was restarted" in oom.message

    class OutOfMemoryError(RuntimeError):  # torch's class, matched by name so the API never imports torch
        pass

    assert map_exception(OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")).restart_worker
    assert map_exception(ModelNotFoundError("weights missing")).error_type == "model_not_found"

    class M(BaseModel):
        n: int

    try:
        M(n="x")
    except ValidationError as e:
        assert map_exception(e).message.startswith("n: Input should be a valid integer")
    boom = map_exception(ZeroDivisionError("division by zero"))
    assert boom.error_type == "internal_error" and "ZeroDivisionError" in boom.message and not boom.restart_worker


def test_engine_settings_build_engine_options(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.settings import Settings

    monkeypatch.setenv("VACE_OFFLOAD", "group")
    monkeypatch.setenv("VACE_FP8", "storage")
    monkeypatch.setenv("VACE_LORAS", "/w/causvid.safetensors:0.5:8:1")
    opts = Settings().engine_options("cuda")
    assert (opts.device, opts.offload, opts.fp8_storage, opts.fp8_linear) == ("cuda", "group", True, False)
    assert opts.loras[0].source == "/w/causvid.safetensors" and opts.loras[0].num_inference_steps == 8
    monkeypatch.setenv("VACE_OFFLOAD", "lots")
    with pytest.raises(ValueError, match="offload"):
        Settings()


@pytest.mark.parametrize("name,want", [
    ("clip one.mp4", "clip_one.mp4"), ("../../etc/passwd", "passwd"), ("..\\..\\x.png", "x.png"),
    ("猫.png", "upload.png"), (".htaccess", "upload.htaccess"), ("", "upload"), ("a.p!n@g", "a.png"),
])
def test_sanitize_filename_keeps_a_servable_name_and_extension(name, want):
    got = media_refs.sanitize_filename(name)
    assert got == want and media_refs._NAME_RE.match(got)
