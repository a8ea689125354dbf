"""Fetch a job's media inputs to local files before any model code runs (cog's rule: inputs outside the model).

Accepted forms: an existing local path, a `data:` URI, or an http(s) URL. The server passes its own
`url_fetcher` (with its network safety rules); the CLI's default fetcher trusts the user's URLs but still
limits size and time.
"""

from __future__ import annotations

import base64
import binascii
import mimetypes
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote_to_bytes

from vace_local.core.errors import InputError
from vace_local.core.spec import JobInputs

MAX_INPUT_BYTES = 512 * 1024 * 1024
FETCH_TIMEOUT_S = 60.0  # longest wait for any one read
FETCH_DEADLINE_S = 900.0  # a whole download, slow senders included
DATA_URI_RE = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,",
                       re.I)

UrlFetcher = Callable[[str, Path, str], Path]


@dataclass
class ResolvedInputs:
    """`JobInputs` with every value a local file."""

    video: Path | None = None
    mask_video: Path | None = None
    mask_image: Path | None = None
    reference_images: list[Path] = field(default_factory=list)
    first_image: Path | None = None
    last_image: Path | None = None
    extend: Path | None = None


def data_uri_bytes(uri: str, field_name: str, max_bytes: int = MAX_INPUT_BYTES) -> tuple[str | None, bytes]:
    """The media type and decoded bytes of a `data:[mime][;base64],payload` URI (RFC 2397).

    Without `;base64` the payload is percent-decoded as bytes (never as UTF-8 text, which would mangle binary
    content); `max_bytes` applies to the decoded bytes either way. InputError names the field."""
    m = DATA_URI_RE.match(uri[:512])
    if not m:
        raise InputError(field_name, "malformed data URI (expected data:<mime>;base64,<payload>)")
    payload = uri[m.end():]
    # cheap pre-checks on the encoded length (base64: 4 chars per 3 bytes; percent-encoding: at most 3 per byte)
    if (len(payload) * 3 // 4 - 2 if m.group("b64") else len(payload) // 3) > max_bytes:
        raise InputError(field_name, f"data URI is larger than the {max_bytes} byte limit")
    if m.group("b64"):
        try:
            data = base64.b64decode(payload.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise InputError(field_name, "data URI payload is not valid base64") from None
    else:
        data = unquote_to_bytes(payload)
    if not data:
        raise InputError(field_name, "data URI is empty")
    if len(data) > max_bytes:
        raise InputError(field_name, f"data URI is larger than the {max_bytes} byte limit ({len(data)} bytes)")
    return m.group("mime"), data


#: Base64 characters decoded per step when a data URI is streamed to disk (a multiple of 4).
_B64_CHUNK = 4 << 20


def write_data_uri(uri: str, field_name: str, max_bytes: int, dest: Path) -> int:
    """Decode a data URI into `dest` in bounded steps and return its size: a 300 MB base64 payload is never
    held decoded in memory as well. Same rules and errors as `data_uri_bytes` (which decodes the rare
    non-base64 form whole)."""
    m = DATA_URI_RE.match(uri[:512])
    if not m or not m.group("b64"):
        data = data_uri_bytes(uri, field_name, max_bytes)[1]
        dest.write_bytes(data)
        return len(data)
    start, end = m.end(), len(uri)
    while start < end and uri[start].isspace():  # strip() would copy the whole payload
        start += 1
    while end > start and uri[end - 1].isspace():
        end -= 1
    if (end - start) * 3 // 4 - 2 > max_bytes:
        raise InputError(field_name, f"data URI is larger than the {max_bytes} byte limit")
    if (end - start) % 4:
        raise InputError(field_name, "data URI payload is not valid base64")
    size = 0
    with open(dest, "wb") as f:
        for i in range(start, end, _B64_CHUNK):
            try:
                chunk = base64.b64decode(uri[i:min(i + _B64_CHUNK, end)], validate=True)
            except (binascii.Error, ValueError):
                raise InputError(field_name, "data URI payload is not valid base64") from None
            f.write(chunk)
            size += len(chunk)
    if not size:
        raise InputError(field_name, "data URI is empty")
    if size > max_bytes:
        raise InputError(field_name, f"data URI is larger than the {max_bytes} byte limit ({size} bytes)")
    return size


def decode_data_uri(uri: str, dest_stem: Path, field_name: str, max_bytes: int = MAX_INPUT_BYTES) -> Path:
    """A data URI written (streamed) to `dest_stem` + the extension of its media type."""
    m = DATA_URI_RE.match(uri[:512])
    ext = mimetypes.guess_extension((m and m.group("mime")) or "") or ".bin"
    out = dest_stem.with_suffix(ext)
    try:
        write_data_uri(uri, field_name, max_bytes, out)
    except InputError:
        out.unlink(missing_ok=True)
        raise
    return out


def default_url_fetcher(url: str, dest_stem: Path, field_name: str) -> Path:
    """Download with a size cap, one wall-clock deadline and a per-wait timeout (CLI use: the user's own URLs
    are trusted, so any address is fine; a slow sender still cannot hold the run past the deadline)."""
    from vace_local.core.http_guard import fetch_url

    suffix = Path(url.split("?", 1)[0]).suffix[:8] or ".bin"
    return fetch_url(url, dest_stem.with_suffix(suffix), field_name, max_bytes=MAX_INPUT_BYTES,
                     timeout_s=FETCH_DEADLINE_S, read_timeout_s=FETCH_TIMEOUT_S)


def fetch_one(value: str, dest_stem: Path, field_name: str, url_fetcher: UrlFetcher = default_url_fetcher) -> Path:
    value = value.strip()
    if value.startswith("data:"):
        return decode_data_uri(value, dest_stem, field_name)
    if re.match(r"^https?://", value, re.I):
        return url_fetcher(value, dest_stem, field_name)
    path = Path(value.removeprefix("file://")).expanduser()
    if not path.is_file():
        raise InputError(field_name, f"not a file, URL or data URI: {value[:200]}")
    return path


def fetch_inputs(inputs: JobInputs, dest: Path, url_fetcher: UrlFetcher = default_url_fetcher) -> ResolvedInputs:
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)

    def get(name: str) -> Path | None:
        value = getattr(inputs, name)
        return fetch_one(value, dest / name, name, url_fetcher) if value else None

    return ResolvedInputs(
        video=get("video"),
        mask_video=get("mask_video"),
        mask_image=get("mask_image"),
        reference_images=[
            fetch_one(v, dest / f"reference_{i}", f"reference_images[{i}]", url_fetcher)
            for i, v in enumerate(inputs.reference_images)
        ],
        first_image=get("first_image"),
        last_image=get("last_image"),
        extend=get("extend"),
    )
