"""Media references: turn a user's media reference (URL, data URI, our file URL) into a local file we are
willing to read, after the checks that keep it safe.

Accepted references are http(s) URLs, `data:` URIs and files served by this server (`/files/uploads/…`,
`/files/outputs/…`). Rules, applied in the API process at submit time (cheap checks, 4xx) and again in the
worker when it downloads (DNS, size, time):

* URLs whose host resolves to any loopback, private, link-local, multicast or reserved address are refused
  unless the host (name, IP or CIDR) is in `Settings.allowed_hosts`; the connection then goes to an address
  that was checked (no second lookup to rebind), and every redirect hop is checked and pinned the same way.
* Downloads stop at `max_download_bytes` and at one `download_timeout_s` wall-clock deadline (slow senders
  included); uploads at `max_upload_bytes`.
* Content is sniffed from its first bytes: image fields need an image, video fields a video.
* Our own file URLs resolve to files under the data dir only; `..`, encoded separators and odd names
  are refused. Local paths supplied by users are never accepted.

Nothing here imports torch; the API process uses it.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote

from vace_local.core.errors import InputError
from vace_local.core.inputs import data_uri_bytes, write_data_uri  # noqa: F401 - write_data_uri re-exported
from vace_local.core.spec import MediaKind

_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
FILE_KINDS = ("uploads", "outputs")
#: The capability token a file URL carries when keys are configured (`server.files.Files.file_token`).
FILE_TOKEN_RE = re.compile(r"^[0-9a-f]{40}$")

_EXT = {
    "png": ("image", "image/png"), "jpeg": ("image", "image/jpeg"), "gif": ("image", "image/gif"),
    "webp": ("image", "image/webp"), "bmp": ("image", "image/bmp"), "tiff": ("image", "image/tiff"),
    "mp4": ("video", "video/mp4"), "mov": ("video", "video/quicktime"), "webm": ("video", "video/webm"),
    "mkv": ("video", "video/x-matroska"), "avi": ("video", "video/x-msvideo"), "flv": ("video", "video/x-flv"),
    "ts": ("video", "video/mp2t"), "mpg": ("video", "video/mpeg"), "ogv": ("video", "video/ogg"),
}


def sniff(head: bytes) -> str | None:
    """File type from magic bytes (an extension key of `_EXT`), or None when unrecognised."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head[:2] == b"BM" and len(head) >= 26:
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1"):
            return None  # still-image containers: not decodable as video here
        return "mov" if brand == b"qt  " else "mp4"
    if head[4:8] in (b"moov", b"mdat", b"wide", b"free", b"skip"):
        return "mov"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "webm" if b"webm" in head[:64] else "mkv"
    if head.startswith(b"FLV"):
        return "flv"
    if head.startswith(b"\x00\x00\x01\xba") or head.startswith(b"\x00\x00\x01\xb3"):
        return "mpg"
    if head.startswith(b"OggS"):
        return "ogv"
    if len(head) > 188 and head[0] == 0x47 and head[188] == 0x47:
        return "ts"
    return None


def kind_of(ext: str | None) -> MediaKind | None:
    return _EXT[ext][0] if ext in _EXT else None  # type: ignore[return-value]


def mime_of(ext: str | None) -> str:
    return _EXT[ext][1] if ext in _EXT else "application/octet-stream"


#: Headers on every stored file we serve: the browser must take our type as given (no sniffing its way to
#: HTML), and should the file still be opened as a page, the sandbox gives it no script and no origin.
FILE_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'; sandbox"}


def served_type(head: bytes, key: str) -> tuple[str, str]:
    """(Content-Type, Content-Disposition) for a stored file (`<uploads|outputs>/<id>/<name>`), from our own
    sniffing of its first bytes, never from what a client declared: an image or video we recognise is shown
    inline as that type; our own JSON metadata is `application/json`; anything else (HTML, SVG, scripts, …) is
    an `application/octet-stream` download."""
    name = key.rsplit("/", 1)[-1]
    ext = sniff(head)
    if ext is not None:
        return mime_of(ext), f'inline; filename="{name}"'
    if key.startswith("outputs/") and name.endswith(".json") and head.lstrip()[:1] == b"{":
        return "application/json", f'inline; filename="{name}"'
    if key.startswith("outputs/") and name.endswith(".zip") and head.startswith(b"PK\x03\x04"):
        return "application/zip", f'attachment; filename="{name}"'
    return "application/octet-stream", f'attachment; filename="{name}"'


def served_headers(head: bytes, key: str) -> tuple[str, dict[str, str]]:
    """The Content-Type and the other headers (`FILE_HEADERS`, disposition) of a stored file's response."""
    ctype, disposition = served_type(head, key)
    return ctype, {**FILE_HEADERS, "Content-Disposition": disposition}


def check_content(head: bytes, field: str, expected: MediaKind) -> str:
    """Raise InputError unless the bytes look like `expected`; returns the detected extension."""
    ext = sniff(head)
    got = kind_of(ext)
    if expected == "video" and ext == "gif":
        return ext  # an animated GIF is a clip too (decoded through ffmpeg)
    if got != expected:
        what = f"a {ext.upper()} {got}" if ext else "not a recognised image or video format"
        want = "an image" if expected == "image" else "a video"
        raise InputError(field, f"must be {want}, but the content is {what}")
    return ext  # type: ignore[return-value]


def check_file(path: Path, field: str, expected: MediaKind) -> str:
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        raise InputError(field, "the file is empty")
    return check_content(head, field, expected)


# ---- hosts -------------------------------------------------------------------------------------------


def _allowed_networks(allowed: list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    nets = []
    for entry in allowed:
        try:
            nets.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            continue
    return nets


def _in_networks(addr: str, nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return any(ip in n or ip.ipv4_mapped in n for n in nets)
    return any(ip in n for n in nets)


def _host_allowed(host: str, allowed: list[str]) -> bool:
    """The host itself is allow-listed: by name, or as an IP literal inside an allowed IP/CIDR."""
    host = host.lower().strip("[]")
    if any(entry.lower().strip() == host for entry in allowed if entry.strip()):
        return True
    return _in_networks(host, _allowed_networks(allowed))


#: IPv6 ranges whose last 32 bits are an IPv4 address the packet ends up at: IPv4-compatible (`::a.b.c.d`,
#: deprecated), SIIT IPv4-translated (`::ffff:0:a.b.c.d`) and the NAT64 well-known prefix (RFC 6052).
_IPV4_IN_LOW_BITS = tuple(ipaddress.IPv6Network(n) for n in ("::/96", "::ffff:0:0:0/96", "64:ff9b::/96"))
#: NAT64 local-use prefix (RFC 8215): site-specific translators, so never a public destination.
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
#: The only IPv6 unicast space IANA hands out for the Internet; everything outside it is special.
_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address] | None:
    """The IPv4 addresses an IPv6 address stands for (mapped, compatible, translated, NAT64, 6to4, Teredo
    server and client), or None when it embeds none: these forms reach the IPv4 host, so its rule applies."""
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    if any(ip in n for n in _IPV4_IN_LOW_BITS):
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip.teredo is not None:
        return list(ip.teredo)
    return None


def _is_public(addr: str) -> bool:
    """Whether a connection to `addr` leaves for the public Internet. An IPv6 form that embeds an IPv4 address
    (6to4, Teredo, NAT64, mapped, compatible) is judged by that IPv4 address; any other IPv6 address must be
    global unicast (2000::/3), not site-local and global by `ipaddress`'s registry."""
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            return all(_is_global(v4) for v4 in embedded)
        if ip not in _GLOBAL_UNICAST or ip in _NAT64_LOCAL or ip.is_site_local:
            return False
    return _is_global(ip)


def _is_global(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                                 or ip.is_reserved or ip.is_unspecified)


def _legacy_ipv4(host: str) -> str | None:
    """The address behind the numeric IPv4 spellings resolvers accept (`2130706433`, `0x7f.1`, `0177.0.0.1`,
    `127.1`), which `ipaddress` rejects but which still reach that address; None for anything else."""
    if not host or not all(c in "0123456789abcdefx." for c in host) or not host[0].isdigit():
        return None
    try:
        return socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        return None


def literal_host_problem(host: str, allowed: list[str]) -> str | None:
    """Submit-time check without DNS: refuse `localhost` and private/loopback IP literals (any spelling)."""
    h = host.lower().strip("[]").rstrip(".")
    if _host_allowed(h, allowed):
        return None
    if h in ("localhost", "localhost.localdomain") or h.endswith(".localhost"):
        return "refers to localhost"
    try:
        ipaddress.ip_address(h)
    except ValueError:
        legacy = _legacy_ipv4(h)
        if legacy is None:
            return None
        if _host_allowed(legacy, allowed):
            return None
        h = legacy
    if not _is_public(h):
        return "points to a loopback, private or link-local address"
    return None


def resolve_checked(host: str, port: int, field: str, allowed: list[str]) -> list[str]:
    """Resolve `host` once and return its addresses, the only ones a connection may then use.

    Every address must be public or inside an allow-listed IP/CIDR (one bad address refuses the host: a
    resolver may hand out any of them); a host allow-listed by name may resolve anywhere. The error names
    the field and the rule, never the addresses (they describe the server's network, not the client's)."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise InputError(field, f"URL host '{host}' cannot be resolved ({e.strerror})") from None
    addrs = list(dict.fromkeys(str(i[4][0]) for i in infos))
    if _host_allowed(host, allowed):
        return addrs
    nets = _allowed_networks(allowed)
    if not addrs or any(not (_is_public(a) or _in_networks(a, nets)) for a in addrs):
        raise InputError(field, f"URL host '{host}' is not allowed: it resolves to a loopback, private or "
                                "link-local address (allow-list it with VACE_ALLOWED_HOSTS)")
    return addrs


def check_host(host: str, port: int, field: str, allowed: list[str]) -> None:
    """Refuse `host` unless every address it resolves to passes `resolve_checked`'s rule."""
    resolve_checked(host, port, field, allowed)


# ---- data URIs and our own file URLs -----------------------------------------------------------------

def decode_data_uri(uri: str, field: str, max_bytes: int) -> bytes:
    """Decode a `data:[mime][;base64],payload` URI (the CLI's decoder, one set of rules); InputError names
    the field on any problem, and `max_bytes` bounds the decoded bytes."""
    return data_uri_bytes(uri, field, max_bytes)[1]


def parse_file_url_path(path: str, field: str) -> tuple[str, str, str, str | None] | None:
    """`/files/<kind>/<id>[/<token>]/<name>` → (kind, id, name, token or None); None if not a files path;
    InputError if unsafe."""
    raw = path
    if not raw.startswith("/files/"):
        return None
    decoded = unquote(raw)
    parts = decoded.split("/")[2:]
    token = parts.pop(2) if len(parts) == 4 and FILE_TOKEN_RE.match(parts[2]) else None
    if (".." in parts or "\\" in decoded or "\x00" in decoded or len(parts) != 3
            or parts[0] not in FILE_KINDS or not _ID_RE.match(parts[1]) or not _NAME_RE.match(parts[2])):
        raise InputError(field, "file URL path is not a valid file of this server (path traversal refused)")
    return parts[0], parts[1], parts[2], token


def safe_data_path(data_dir: Path, kind: str, ident: str, name: str) -> Path:
    """Path of a served file, guaranteed inside `data_dir/<kind>`; raises ValueError otherwise."""
    if kind not in FILE_KINDS or not _ID_RE.match(ident) or not _NAME_RE.match(name):
        raise ValueError("bad file reference")
    root = (data_dir / kind).resolve()
    p = (root / ident / name).resolve()
    if not p.is_relative_to(root):
        raise ValueError("path escapes the data dir")
    return p


def sanitize_filename(name: str, default: str = "upload") -> str:
    """A served file name (`_NAME_RE`): the last path part, odd characters replaced, extension kept."""
    base = Path(name.replace("\\", "/")).name
    stem, dot, ext = base.rpartition(".")
    if not dot:
        stem, ext = base, ""
    ext = re.sub(r"[^A-Za-z0-9]+", "", ext)[:16]
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")[:100] or default
    return f"{clean}.{ext}" if ext else clean


# ---- downloads (worker side) -------------------------------------------------------------------------


def download(url: str, dest: Path, field: str, *, allowed: list[str], max_bytes: int, timeout_s: float,
             max_redirects: int = 5, should_cancel: Callable[[], bool] | None = None) -> Path:
    """Stream `url` to `dest` within one wall-clock deadline (connect, headers, body, every redirect hop) and
    the size limit; each connection (each redirect hop too) connects only to addresses `resolve_checked`
    approved, and `should_cancel` is honoured between socket waits (JobCancelled)."""
    from vace_local.core.http_guard import fetch_url

    def resolve(host: str, port: int) -> list[str]:
        return resolve_checked(host, port, field, allowed)

    return fetch_url(url, dest, field, max_bytes=max_bytes, timeout_s=timeout_s, resolve=resolve,
                     should_cancel=should_cancel, max_redirects=max_redirects)
