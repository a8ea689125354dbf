"""The one walk over a job's media inputs, and the CLI's fetcher of them (cog's rule: inputs outside the model).

`walk_inputs` visits every media value of a `JobInputs` / `ResolvedInputs` (the fields of
`vace_local.core.spec.MEDIA_FIELDS`) and hands each, by its form (`data:` URI, http(s) URL or anything else,
a path), to the `Fetcher` its caller passes in. Three callers, three fetchers: the API's submit-time checks
(data URIs stored as uploads, our own file URLs mapped to files, URL hosts checked, local paths refused), the
worker's (guarded downloads, content sniffing) and the CLI's `local_fetcher` (trusts the user's URLs and paths
but still limits size and time; its URL part is the `url_fetcher` argument).
"""

from __future__ import annotations

import base64
import binascii
import mimetypes
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Literal, TypeVar
from urllib.parse import unquote_to_bytes

from vace_local.core.errors import InputError
from vace_local.core.spec import MEDIA_FIELDS, JobInputs, MediaField, MediaInputs, MediaKind

MAX_INPUT_BYTES = 512 * 1024 * 1024
FETCH_TIMEOUT_S = 60.0  # longest wait for any one read
FETCH_DEADLINE_S = 900.0  # a whole download, slow senders included
DATA_URI_RE = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,",
                       re.I)

UrlFetcher = Callable[[str, Path, str], Path]
R = TypeVar("R")
M = TypeVar("M", bound=MediaInputs)


class ResolvedInputs(MediaInputs[Path]):
    """`JobInputs` with every value a local file."""


@dataclass(frozen=True)
class MediaRef:
    """One media value of a job, as the walk hands it to a fetcher."""

    #: The JobInputs path errors name: `video`, `reference_images[2]`.
    label: str
    kind: MediaKind
    value: str
    #: A file name stem for a local copy: `video`, `reference_images_2`.
    stem: str

    @property
    def form(self) -> Literal["data", "url", "path"]:
        """How the value is given: a data URI, an http(s) URL, or anything else (a path)."""
        head = self.value.lstrip()[:8].lower()
        if head.startswith("data:"):
            return "data"
        return "url" if head.startswith(("http://", "https://")) else "path"


@dataclass(frozen=True)
class Fetcher(Generic[R]):
    """What one caller makes of each form of media reference (a local file, a checked reference)."""

    data_uri: Callable[[MediaRef], R]
    url: Callable[[MediaRef], R]
    path: Callable[[MediaRef], R]

    def __call__(self, ref: MediaRef) -> R:
        form = ref.form
        if form == "data":
            return self.data_uri(ref)
        return self.url(ref) if form == "url" else self.path(ref)


def _field_refs(f: MediaField, value: object) -> list[MediaRef]:
    if f.many:
        return [MediaRef(f"{f.name}[{i}]", f.kind, str(v), f"{f.name}_{i}") for i, v in enumerate(value or [])]
    return [MediaRef(f.name, f.kind, str(value), f.name)] if value else []


def input_refs(inputs: MediaInputs) -> Iterator[MediaRef]:
    """Every given media value of `inputs`, in MEDIA_FIELDS order."""
    for f in MEDIA_FIELDS:
        yield from _field_refs(f, getattr(inputs, f.name))


def walk_inputs(inputs: MediaInputs, fetch: Callable[[MediaRef], R], into: type[M]) -> M:
    """`inputs` with every media value replaced by `fetch(ref)` (a `Fetcher`), as an `into`: the one walk the
    API's submit checks, the worker and the CLI share. Errors (InputError) name the JobInputs path."""
    out: dict[str, object] = {}
    for f in MEDIA_FIELDS:
        got = [fetch(ref) for ref in _field_refs(f, getattr(inputs, f.name))]
        out[f.name] = got if f.many else (got[0] if got else None)
    return into.model_validate(out)


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


def local_path(ref: MediaRef) -> Path:
    """The CLI's rule for a path: an existing local file (`file://` accepted)."""
    path = Path(ref.value.strip().removeprefix("file://")).expanduser()
    if not path.is_file():
        raise InputError(ref.label, f"not a file, URL or data URI: {ref.value.strip()[:200]}")
    return path


def local_fetcher(dest: Path, url_fetcher: UrlFetcher = default_url_fetcher) -> Fetcher[Path]:
    """The CLI's fetcher: data URIs decoded into `dest`, URLs downloaded there by `url_fetcher`, paths as
    they are (they must exist)."""
    return Fetcher(
        data_uri=lambda ref: decode_data_uri(ref.value.strip(), dest / ref.stem, ref.label),
        url=lambda ref: url_fetcher(ref.value.strip(), dest / ref.stem, ref.label),
        path=local_path,
    )


def fetch_inputs(inputs: JobInputs, dest: Path, url_fetcher: UrlFetcher = default_url_fetcher) -> ResolvedInputs:
    """Every input of a CLI job as a local file (data URIs and downloads written under `dest`)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    return walk_inputs(inputs, local_fetcher(dest, url_fetcher), ResolvedInputs)
