"""The web playground in a real headless Chromium against a live tiny server (real uploads, real jobs).

Needs Debian's `chromium` (installed by scripts/setup.sh when it can) and the `playwright` Python package
(the `dev` extra); Playwright's own browser download is not used, it drives the system executable.
Screenshots go to `test-artifacts/playground/` (git-ignored) for a person to look at.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from test_server_live import KEY, LiveServer

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "vace"
ARTIFACTS = ROOT / "test-artifacts" / "playground"


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("play")
    env = {"VACE_TINY_HOLD_FILE": str(data / "hold")}  # tests that need to see a job mid-run write it
    srv = LiveServer(data, tmp_path_factory.mktemp("play-cache"), extra_env=env).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (the `dev` extra)")
    exe = _chromium()
    if exe is None:
        pytest.skip("no chromium executable on PATH (scripts/setup.sh installs Debian's `chromium` as root)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def test_page_public_api_keyed(server):
    """With keys configured the page and its assets load without one; the progress API still needs it."""
    r = httpx.get(f"{server.base}/", follow_redirects=False, timeout=10)
    assert r.status_code in (302, 307) and r.headers["location"] == "/playground"
    page = httpx.get(f"{server.base}/playground", timeout=10)
    assert page.status_code == 200 and "<form id=\"gen\"" in page.text
    for asset in ("playground.js", "playground.css"):
        assert httpx.get(f"{server.base}/playground/assets/{asset}", timeout=10).status_code == 200
    # no external CDN or font: every src/href is a local path
    assert not re.search(r"""(src|href)=["']https?://""", page.text)
    r = httpx.get(f"{server.base}/api/v3/predictions/nope/progress", timeout=10)
    assert r.status_code == 401 and r.json()["code"] == 401


def test_progress_route_logs_and_previews(server):
    """The extension route the page polls: live fields, log lines from `since`, and the previews a job
    submitted with `save_previews` wrote (no browser needed)."""
    auth = {"Authorization": f"Bearer {KEY}"}
    data = server.submit({"prompt": "a lighthouse", "num_inference_steps": 1, "seed": 1, "save_previews": True})
    url = f"{server.base}/api/v3/predictions/{data['id']}/progress"
    seen, lines, since = set(), [], 0
    deadline = time.time() + 60
    while time.time() < deadline:
        p = httpx.get(url, params={"since": since}, headers=auth, timeout=10).json()["data"]
        assert p["next"] == since + len(p["logs"])
        lines += p["logs"]
        since = p["next"]
        seen.add(p["status"])
        if p["status"] in ("completed", "failed"):
            break
        time.sleep(0.2)
    assert p["status"] == "completed", p
    assert p["stage"] == "done" and p["step"] == p["total"] == 1 and p["progress"] == 1.0
    msgs = [x["message"] for x in lines]
    assert msgs[0].startswith("queued via wavespeed") and any(m.startswith("completed in") for m in msgs)
    assert not any("ignored unknown fields" in m for m in msgs)  # save_previews is a field, not an extra
    assert len(msgs) == len(set(msgs)), "a log line was sent twice across `since` pages"
    assert set(p["previews"]) == {"control", "mask"}
    for u in [*p["outputs"], *p["previews"].values()]:
        r = httpx.get(u, headers=auth, timeout=10)
        assert r.status_code == 200 and r.headers["content-type"] == "video/mp4" and len(r.content) > 1000


def _ready_video(page, selector: str, timeout_ms: int = 20_000) -> dict:
    page.wait_for_function("s => { const v = document.querySelector(s); return v && v.readyState >= 2 && "
                           "v.duration > 0; }", arg=selector, timeout=timeout_ms)
    return page.eval_on_selector(selector, "v => ({ready: v.readyState, duration: v.duration, w: v.videoWidth, "
                                           "h: v.videoHeight})")


def test_playground_end_to_end(server, browser):
    if not FIXTURES.is_dir():
        pytest.skip("../shared/fixtures absent")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    requested: list[str] = []
    page_errors: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    page.on("pageerror", lambda e: page_errors.append(str(e)))

    page.goto(f"{server.base}/")
    assert page.url == f"{server.base}/playground"
    page.wait_for_selector("#tiny-banner:not([hidden])")
    # record every status line the page shows (the job is fast: polling alone could miss the steps)
    page.evaluate("""() => { window.__statuses = [];
        new MutationObserver(() => window.__statuses.push(document.querySelector('#status').textContent))
          .observe(document.querySelector('#status'), {childList: true, characterData: true, subtree: true}); }""")

    page.get_by_label("Prompt", exact=True).fill("a kitten boxing in a ring")
    page.get_by_label("Task").select_option("depth")
    page.set_input_files("#video-input", str(FIXTURES / "test.mp4"))
    page.set_input_files("#images-input", [str(FIXTURES / "test.jpg"), str(FIXTURES / "test2.jpg")])
    # a third reference by drag and drop (a real `drop` event carrying a File)
    jpg = base64.b64encode((FIXTURES / "test3.jpg").read_bytes()).decode()
    dropped = page.evaluate_handle("""b64 => { const dt = new DataTransfer();
        dt.items.add(new File([Uint8Array.from(atob(b64), c => c.charCodeAt(0))], 'test3.jpg', {type: 'image/jpeg'}));
        return dt; }""", jpg)
    page.dispatch_event("[data-drop=images]", "drop", {"dataTransfer": dropped})
    assert page.locator("#refs .name").all_inner_texts() == ["test.jpg", "test2.jpg", "test3.jpg"]
    page.get_by_role("button", name="Move down test.jpg (image 1)").focus()  # keyboard: order matters
    page.keyboard.press("Enter")
    assert page.locator("#refs .name").all_inner_texts() == ["test2.jpg", "test.jpg", "test3.jpg"]

    # a validation error from the server, shown with the field it named
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea')]
        .filter(el => !el.labels.length && !el.getAttribute('aria-label')).map(el => el.id || el.name)""")
    assert not unlabelled, unlabelled
    page.locator("#advanced summary").focus()  # the collapsed advanced section opens from the keyboard
    page.keyboard.press("Enter")
    assert page.locator("#advanced").get_attribute("open") is not None
    page.get_by_label("Steps").fill("99")
    page.get_by_label("Seed").fill("7")
    page.get_by_role("button", name="Generate").click()
    # the server has a key: the page asks for it once and keeps it
    page.wait_for_selector("#key-dialog[open]")
    page.locator("#key-input").fill(KEY)
    page.locator("#key-save").click()
    err = page.locator("#form-error")
    err.wait_for(state="visible")
    assert err.locator(".field-name").inner_text() == "num_inference_steps"
    assert "less than or equal to 40" in err.inner_text()
    assert page.get_by_label("Steps").get_attribute("aria-invalid") == "true"
    page.screenshot(path=str(ARTIFACTS / "1-validation-error.png"), full_page=True)

    # an upload refused by the server names the form's field, not the upload endpoint's `file`
    page.set_input_files("#mask_image-input", {"name": "empty.png", "mimeType": "image/png", "buffer": b""})
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("() => document.querySelector('#form-error .field-name')?.textContent === 'mask_image'")
    assert "empty" in err.inner_text()
    assert page.locator("[data-field=mask_image]").get_attribute("aria-invalid") == "true"
    page.get_by_role("button", name="Remove mask image").click()

    page.get_by_label("Steps").fill("2")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("() => /^(Completed|Failed)/.test(document.querySelector('#status').textContent)",
                           timeout=300_000)  # a loaded box: the inpainting preprocess alone took 60 s
    status = page.locator("#status").inner_text()
    assert status.startswith("Completed"), f"{status}\n{page.locator('#logs').inner_text()}"
    statuses = page.evaluate("window.__statuses")
    assert any(s.startswith("Running — stage ") for s in statuses), statuses  # seen live, not only the end
    assert status == "Completed — stage done — step 2/2", status
    logs = page.locator("#logs").inner_text()
    assert "stage generate" in logs and "queued via wavespeed" in logs
    out = _ready_video(page, "#result")
    control = _ready_video(page, "#preview-control")
    mask = _ready_video(page, "#preview-mask")
    assert out["w"] > 0 and control["w"] == out["w"] and mask["h"] == out["h"], (out, control, mask)
    page.evaluate("document.querySelectorAll('video').forEach(v => { v.pause(); v.currentTime = v.duration / 2; })")
    page.wait_for_timeout(300)
    page.screenshot(path=str(ARTIFACTS / "2-completed.png"), full_page=True)

    job_id = page.locator("#run-title").inner_text().removeprefix("Run ").strip()
    prog = httpx.get(f"{server.base}/api/v3/predictions/{job_id}/progress",
                     headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()["data"]
    assert set(prog["previews"]) == {"control", "mask"} and prog["status"] == "completed"
    spec = json.loads(server.row(job_id)["spec"])
    sent = [Path(p).name for p in spec["inputs"]["reference_images"]]
    assert sent == ["test2.jpg", "test.jpg", "test3.jpg"], sent  # the order the page showed
    assert Path(spec["inputs"]["video"]).name == "test.mp4" and spec["num_inference_steps"] == 2

    # recent jobs survive a reload (localStorage) with their parameters; re-run behind a busy worker (so it
    # shows its queue position), then cancel it while queued
    hold = server.data_dir / "hold"  # the blocker holds after step 1 (VACE_TINY_HOLD_FILE) until cancelled
    hold.write_text("1")
    blocker = server.submit({"prompt": "keeps the worker busy", "task": "none", "num_inference_steps": 40})
    server.wait(blocker["id"], lambda r: r["status"] == "running", timeout=30, what="blocker running")
    page.reload()
    entry = page.locator(f"#history-list li[data-id='{job_id}']")
    assert "steps 2" in entry.inner_text() and "seed 7" in entry.inner_text() and "3 reference(s)" in entry.inner_text()
    entry.get_by_role("button", name=f"Re-run job {job_id}").click()
    assert page.get_by_label("Prompt", exact=True).input_value() == "a kitten boxing in a ring"
    page.wait_for_function("() => /^Queued — position 1 /.test(document.querySelector('#status').textContent)",
                           timeout=10_000)
    page.screenshot(path=str(ARTIFACTS / "3-queued.png"), full_page=True)
    page.get_by_role("button", name="Cancel").click()
    page.wait_for_function("() => /^(Completed|Failed)/.test(document.querySelector('#status').textContent)",
                           timeout=30_000)
    assert page.locator("#status").inner_text() == "Failed: cancelled by request"
    assert "cancelled by request while queued" in page.locator("#logs").inner_text()
    httpx.post(f"{server.base}/api/v3/predictions/{blocker['id']}/cancel", headers={"Authorization": f"Bearer {KEY}"},
               timeout=10)
    server.wait(blocker["id"], lambda r: r["status"] == "cancelled", timeout=30, what="blocker cancelled")
    hold.unlink()
    assert page.locator("#key-dialog[open]").count() == 0  # the key was kept: not asked again
    assert page.locator("#history-list li").count() == 2
    page.screenshot(path=str(ARTIFACTS / "4-cancelled.png"), full_page=True)

    assert not page_errors, page_errors
    foreign = [u for u in requested if not u.startswith((server.base, "blob:", "data:"))]
    assert not foreign, foreign  # no CDN, no font host: the box may be offline
    page.close()
    assert time.monotonic() - t0 < 90


def _stroke(page, canvas: str, points: list[tuple[float, float]]) -> None:
    """Drag the mouse through `points` given as fractions of the canvas's shown box."""
    box = page.locator(canvas).bounding_box()
    xy = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*xy[0])
    page.mouse.down()
    for p in xy[1:]:
        page.mouse.move(*p, steps=8)
    page.mouse.up()


def _stored_input(server, job_id: str, field: str):  # noqa: ANN202 - PIL image
    from PIL import Image

    spec = json.loads(server.row(job_id)["spec"])
    return Image.open(spec["inputs"][field])


def _run_to_completion(page) -> str:
    page.get_by_role("button", name="Generate").click()
    return _run_to_completion_wait(page)


def _open_keyed_playground(server, browser, height: int):  # noqa: ANN202 - (Playwright page, its errors)
    """The playground page with the API key stored, and the list its uncaught page errors go to."""
    page = browser.new_page(viewport={"width": 1400, "height": height})
    page_errors: list[str] = []
    page.on("pageerror", lambda e: page_errors.append(str(e)))
    page.goto(f"{server.base}/playground")
    page.evaluate("k => localStorage.setItem('vace.playground.apiKey', k)", KEY)
    return page, page_errors


def test_mask_painter(server, browser):
    """Paint over the first frame of a video (decoded by the browser) and over a still: brush, size, eraser,
    invert and clear; the stored mask has exactly the painted stroke (pixel check)."""
    if not FIXTURES.is_dir():
        pytest.skip("../shared/fixtures absent")
    import numpy as np

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page, page_errors = _open_keyed_playground(server, browser, 1300)
    page.get_by_label("Prompt", exact=True).fill("replace the painted band")
    page.get_by_label("Task").select_option("inpainting")
    page.set_input_files("#video-input", str(FIXTURES / "test.mp4"))
    page.locator("#advanced summary").click()
    page.get_by_label("Steps").fill("1")
    page.get_by_role("button", name="Load frame").click()
    page.wait_for_selector("#paint-canvas:not([hidden])")
    w, h = page.eval_on_selector("#paint-canvas", "c => [c.width, c.height]")
    assert (w, h) > (16, 16)
    # the canvas shows the decoded first frame: not blank
    assert page.evaluate("""() => { const c = document.querySelector('#paint-canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let s = 0;
        for (let i = 0; i < d.length; i += 4) s += d[i] + d[i + 1] + d[i + 2]; return s; }""") > 0
    assert page.get_by_label("Send the painted mask").is_checked()

    masked = ("() => { const m = painter.mask; const d = m.getContext('2d').getImageData(0, 0, m.width, "
              "m.height).data; let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; "
              "return n / (m.width * m.height); }")
    _stroke(page, "#paint-canvas", [(0.1, 0.1), (0.2, 0.2)])  # scribble, then clear it
    assert page.evaluate(masked) > 0
    page.get_by_role("button", name="Clear", exact=True).click()
    assert page.evaluate(masked) == 0
    page.get_by_role("button", name="Invert", exact=True).click()
    assert page.evaluate(masked) == 1.0
    page.get_by_role("button", name="Invert", exact=True).click()
    assert page.evaluate(masked) == 0

    # the known stroke: a band across the middle, 40 px wide (frame pixels), with a hole erased at its centre
    page.locator("#brush-size").fill("40")
    _stroke(page, "#paint-canvas", [(0.15, 0.5), (0.85, 0.5)])
    page.get_by_role("button", name="Eraser", exact=True).click()
    page.locator("#brush-size").fill("20")
    _stroke(page, "#paint-canvas", [(0.5, 0.5), (0.5, 0.5)])
    page.get_by_role("button", name="Brush", exact=True).click()
    page.screenshot(path=str(ARTIFACTS / "5-mask-painted.png"), full_page=True)
    job_id = _run_to_completion(page)
    assert page.locator("#painted-figure").is_visible()
    _ready_video(page, "#preview-mask")
    page.screenshot(path=str(ARTIFACTS / "6-mask-painter-result.png"), full_page=True)

    mask = np.asarray(_stored_input(server, job_id, "mask_image").convert("L"))
    assert mask.shape == (h, w)
    y = h // 2
    for fx in (0.2, 0.35, 0.65, 0.8):  # on the band
        assert mask[y, int(fx * w)] == 255 and mask[y + 15, int(fx * w)] == 255, fx
    for fx in (0.05, 0.95):  # beyond the ends (the round cap reaches 20 px)
        assert mask[y, int(fx * w)] == 0, fx
    assert mask[y - 30, w // 3] == 0 and mask[y + 30, w // 3] == 0  # above and below the band
    assert mask[y, w // 2] == 0 and mask[y + 15, w // 2] == 255  # the erased hole (radius 10) inside the band
    assert 0.5 < (mask > 0).mean() / (40 * 0.7 * w / (w * h)) < 1.5  # about the band's area, nothing else
    logs = page.locator("#logs").inner_text()
    assert "mask_image" in json.dumps(json.loads(server.row(job_id)["spec"])["inputs"]) and "completed" in logs

    # a still: the painted pixels of the first frame image become transparent (content_aware: generate there)
    page.get_by_label("Paint over", exact=True).select_option("first_image")
    page.set_input_files("#first_image-input", str(FIXTURES / "test.jpg"))
    page.get_by_role("button", name="Remove video").click()
    page.get_by_label("Task").select_option("none")
    page.get_by_role("button", name="Load frame").click()
    page.wait_for_selector("#paint-canvas:not([hidden])")
    w2, h2 = page.eval_on_selector("#paint-canvas", "c => [c.width, c.height]")
    page.locator("#brush-size").fill("30")
    _stroke(page, "#paint-canvas", [(0.5, 0.2), (0.5, 0.8)])
    page.get_by_role("button", name="Generate").click()  # the stored input is what is checked: no need to wait
    page.wait_for_function("id => !document.querySelector('#run-title').textContent.includes(id)", arg=job_id)
    job2 = page.locator("#run-title").inner_text().removeprefix("Run ").strip()
    page.get_by_role("button", name="Cancel").click()
    still = np.asarray(_stored_input(server, job2, "first_image").convert("RGBA"))
    assert still.shape[:2] == (h2, w2)
    x = w2 // 2
    assert still[h2 // 2, x, 3] == 0 and still[int(0.3 * h2), x + 10, 3] == 0  # painted: transparent
    assert still[h2 // 2, x + 40, 3] == 255 and still[h2 // 20, x, 3] == 255  # elsewhere: the image, opaque
    page.screenshot(path=str(ARTIFACTS / "7-mask-painter-still.png"), full_page=True)
    assert not page_errors, page_errors
    page.close()


def test_live_preview(server, browser):
    """While a job denoises, the progress route hands out the worker's live preview (an animated WebP of x0 at
    latent resolution, a new URL per preview) and the page shows it, step by step."""
    import io

    from PIL import Image

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page, page_errors = _open_keyed_playground(server, browser, 1000)
    page.evaluate("""() => { window.__live = [];
        new MutationObserver(() => window.__live.push([document.querySelector('#live-caption').textContent,
                                                       document.querySelector('#status').textContent]))
          .observe(document.querySelector('#live-caption'),
                   {childList: true, characterData: true, subtree: true}); }""")
    page.get_by_label("Prompt", exact=True).fill("a lighthouse at dusk")
    page.get_by_label("Task").select_option("none")
    page.locator("#advanced summary").click()
    page.get_by_label("Steps").fill("40")
    hold = server.data_dir / "hold"  # the job holds after step 10 (VACE_TINY_HOLD_FILE): the page is seen mid-run
    hold.write_text("10")
    try:
        page.get_by_role("button", name="Generate").click()
        page.wait_for_selector("#live-figure:not([hidden])", timeout=120_000)
        page.wait_for_function("() => /step [0-9]+\\/40$/.test(document.querySelector('#live-caption').textContent)",
                               timeout=120_000)
        page.screenshot(path=str(ARTIFACTS / "8-live-preview.png"), full_page=True)
    finally:
        hold.unlink(missing_ok=True)
    job_id = _run_to_completion_wait(page)
    page.wait_for_function("() => /step 40\\/40$/.test(document.querySelector('#live-caption').textContent)")
    page.screenshot(path=str(ARTIFACTS / "9-live-preview-done.png"), full_page=True)
    seen = page.evaluate("window.__live")
    running = [c for c, status in seen if status.startswith("Running")]
    steps = [int(re.search(r"step (\d+)/40", c).group(1)) for c, _ in seen]
    assert running and min(steps) < 40 and steps == sorted(steps), seen  # shown live, in order
    assert all(s % 5 == 0 for s in steps), steps  # VACE_PREVIEW_EVERY's default: every 5 steps

    auth = {"Authorization": f"Bearer {KEY}"}
    p = httpx.get(f"{server.base}/api/v3/predictions/{job_id}/progress", headers=auth, timeout=10).json()["data"]
    pv = p["preview"]
    assert (pv["step"], pv["total"]) == (40, 40) and pv["url"].endswith(".webp")
    r = httpx.get(pv["url"], timeout=10)  # a capability URL, like the outputs
    assert r.status_code == 200 and r.headers["content-type"] == "image/webp"
    with Image.open(io.BytesIO(r.content)) as im:
        assert im.n_frames == pv["frames"] == 5 and im.size == (pv["width"], pv["height"])  # 17 frames → 5 latent
    assert not page_errors, page_errors
    page.close()


def _run_to_completion_wait(page) -> str:
    page.wait_for_function("() => /^(Completed|Failed)/.test(document.querySelector('#status').textContent)",
                           timeout=300_000)  # a loaded CI box: the inpainting preprocess alone took 60 s
    status = page.locator("#status").inner_text()
    assert status.startswith("Completed"), f"{status}\n{page.locator('#logs').inner_text()}"
    return page.locator("#run-title").inner_text().removeprefix("Run ").strip()
