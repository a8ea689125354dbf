"""What a request must pass before a route reads its body: the Host / Origin check of a key-less server, and the
body policy of its route (content types, total size, JSON shape), enforced while the body streams in.

* Key-less (the localhost default), any web page the user opens could otherwise drive the API: a cross-site
  `fetch`/form POST (CSRF) or a page whose name resolves to 127.0.0.1 (DNS rebinding). So without API keys a
  request is refused (403) when its `Host` is not a name this server serves (`localhost`, `127.0.0.1`, `[::1]`,
  the bound address, `public_base_url`'s host, `Settings.server_names`) or when it carries an `Origin` other than
  the server's own (`Settings.allowed_origins` adds more). Clients that are not browsers send no `Origin`.
* A route declares what its body may be with `@accepts(POLICY)`: the content types (others: 415, naming the
  type) and the size class (`media`: one upload-sized data URI plus JSON; `upload`: one file; `json`: JSON only).
  Undeclared routes keep the media size and the JSON shape rules, with any content type.
* JSON is counted as it arrives (`JsonShape`): nesting depth, values, and the bytes of everything besides data
  URIs; past a limit the request is a 400/413 naming the limit and the field, after reading at most one chunk
  more than the limit, so a 280 MB `[1,1,…]` body costs the API process a few kilobytes, not its memory.
* `read_json` parses a checked body off the event loop and keeps the big data-URI strings out of `json.loads`
  (a skeleton is parsed; each big string is decoded in steps), so no single step holds the GIL for long.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from fastapi import HTTPException, Request
from starlette.responses import Response

from server.errors import ApiError
from server.settings import Settings, max_request_bytes
from vace_local.core.errors import Problem

F = TypeVar("F", bound=Callable[..., Any])

#: Where the body's JsonShape is kept for `read_json` (the ASGI scope is shared by middleware and route).
SCOPE_KEY = "vace.json_shape"
#: Longest field name (object key) accepted anywhere: the longest real one is ~30 characters.
MAX_KEY_BYTES = 256
#: Data-URI strings longer than this are kept out of `json.loads` and decoded in steps.
BIG_STRING_BYTES = 1 << 16
_DECODE_STEP = 8 << 20
#: Size classes (`BodyPolicy.size`): bytes of a whole body.
SizeClass = Literal["media", "upload", "json"]
ContentKind = Literal["json", "multipart", "form"]


class BodyRefused(HTTPException):
    """A body refused by its route's policy, rendered in the dialect's envelope (app.py). An HTTPException so
    that FastAPI's own body reader passes it on instead of turning it into "error parsing the body"."""

    def __init__(self, status_code: int, message: str, error_type: str, field: str = "body") -> None:
        super().__init__(status_code, message)
        self.error = ApiError(status_code, message, error_type=error_type,
                              problems=[Problem(field, message, error_type)])


@dataclass(frozen=True)
class BodyPolicy:
    """What one route's body may be: content kinds (None: anything, e.g. raw upload bytes) and a size class."""

    content: tuple[ContentKind, ...] | None
    size: SizeClass

    def max_bytes(self, s: Settings) -> int:
        if self.size == "upload":
            return s.max_upload_bytes + (1 << 20)  # one file plus multipart framing
        if self.size == "json":
            return s.max_json_text_bytes
        return max_request_bytes(s)


JSON_MEDIA = BodyPolicy(("json",), "media")
JSON_SMALL = BodyPolicy(("json",), "json")
JSON_OR_FORM_MEDIA = BodyPolicy(("json", "multipart", "form"), "media")
MULTIPART_UPLOAD = BodyPolicy(("multipart",), "upload")
RAW_UPLOAD = BodyPolicy(None, "upload")
#: Routes that declare nothing: any content type, the media size, JSON bodies shape-checked.
DEFAULT = BodyPolicy(None, "media")
_POLICY_ATTR = "__vace_body_policy__"


def accepts(policy: BodyPolicy) -> Callable[[F], F]:
    """Declare a route's body policy (put it below the router decorator)."""

    def mark(fn: F) -> F:
        setattr(fn, _POLICY_ATTR, policy)
        return fn

    return mark


def policy_of(endpoint: Any) -> BodyPolicy | None:
    return getattr(endpoint, _POLICY_ATTR, None)


def content_kind(content_type: str) -> ContentKind | None:
    """The kind of a Content-Type header value (parameters ignored), None for anything else."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return "json"
    if media == "multipart/form-data":
        return "multipart"
    if media == "application/x-www-form-urlencoded":
        return "form"
    return None


# ---- JSON shape, counted as the body streams in ------------------------------------------------------------

_STRUCT = re.compile(rb'["{}\[\],:]')
#: The rest of a string that has escapes: plain runs and `\x` pairs (stops at `"` or a lone trailing `\`).
_STR_REST = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*', re.S)


@dataclass
class _Level:
    kind: int  # ord("{") or ord("[")
    index: int = 0
    key: str | None = None


class JsonShape:
    """Counts a JSON body chunk by chunk without parsing it: depth, values (members and elements), bytes outside
    data-URI strings, field-name length. Syntax is left to the parser; this only bounds what parsing can cost.
    Each chunk is scanned with C-speed searches, and a hostile run of tokens stops at the value limit."""

    def __init__(self, max_depth: int, max_values: int, max_text_bytes: int) -> None:
        self.max_depth, self.max_values, self.max_text = max_depth, max_values, max_text_bytes
        self.pos = 0  # bytes fed
        self.values = 0
        self.data_bytes = 0  # bytes inside finished data-URI strings
        self.stack: list[_Level] = []
        self.expect_key = False
        self.in_string = False
        self.escape_pending = False
        self.str_start = 0
        self.str_key = False
        self.str_head = b""
        self.str_escaped = False
        #: (start, end) offsets of the contents of big data-URI strings without escapes (for `read_json`).
        self.big_strings: list[tuple[int, int]] = []

    # -- where we are, for messages --
    def path(self) -> str:
        out = ""
        for level in self.stack:
            if level.kind == 0x7B:
                if level.key is not None:
                    out += ("." if out else "") + level.key
            else:
                out += f"[{level.index}]"
        return out or "body"

    def _refuse(self, status: int, message: str, etype: str) -> BodyRefused:
        field = self.path()
        return BodyRefused(status, f"{field}: {message}" if field != "body" else message, etype, field)

    def feed(self, buf: bytes) -> None:
        i, n = 0, len(buf)
        while i < n:
            if self.in_string:
                i = self._string(buf, i, n)
                continue
            m = _STRUCT.search(buf, i)
            if m is None:
                break
            i = m.end()
            c = buf[m.start()]
            if c == 0x22:  # "
                self.in_string, self.str_start, self.str_key = True, self.pos + i, self.expect_key
                self.str_head, self.str_escaped = b"", False
            elif c in (0x7B, 0x5B):  # { [
                self._count_value()
                if len(self.stack) >= self.max_depth:
                    raise self._refuse(400, f"JSON nested more than {self.max_depth} levels deep (the request "
                                            "body's depth limit, VACE_MAX_JSON_DEPTH)", "json_too_deep")
                self.stack.append(_Level(c))
                self.expect_key = c == 0x7B
            elif c in (0x7D, 0x5D):  # } ]
                if self.stack:
                    self.stack.pop()
                self.expect_key = False
            elif c == 0x2C:  # ,
                self._count_value()
                if self.stack:
                    top = self.stack[-1]
                    top.index += 1
                    self.expect_key = top.kind == 0x7B
            else:  # :
                self.expect_key = False
        self.pos += n
        self._check_text()

    def _count_value(self) -> None:
        self.values += 1
        if self.values > self.max_values:
            raise self._refuse(413, f"request body has more than {self.max_values} JSON values (the limit, "
                                    "VACE_MAX_JSON_VALUES)", "too_many_values")

    def _string(self, buf: bytes, i: int, n: int) -> int:
        """Scan inside a string from `i`; returns where scanning goes on (after the closing quote, or `n`)."""
        if self.escape_pending:
            self.escape_pending, i = False, i + 1
            if i >= n:
                return n
        q = buf.find(b'"', i)
        end = q if q != -1 else n
        if buf.find(b"\\", i, end) != -1:  # escapes: let the regex walk the pairs
            self.str_escaped = True
            j = _STR_REST.match(buf, i).end()
            if j < n and buf[j] == 0x5C:  # a lone backslash ends the chunk: its pair comes next
                self.escape_pending, end, q = True, n, -1
            else:
                end, q = j, (j if j < n else -1)
        if len(self.str_head) < 64:
            self.str_head += buf[i:min(end, i + 64 - len(self.str_head))]
        length = self.pos + end - self.str_start
        if self.str_key and length > MAX_KEY_BYTES:
            raise self._refuse(413, f"a field name longer than {MAX_KEY_BYTES} bytes", "field_name_too_long")
        if q == -1:
            return n
        self._string_done(length)
        return q + 1

    def _string_done(self, length: int) -> None:
        self.in_string = False
        if self.str_key:
            if self.stack:
                self.stack[-1].key = self.str_head.decode("utf-8", "replace")[:64]
        elif self._is_data_uri():
            self.data_bytes += length
            if length > BIG_STRING_BYTES and not self.str_escaped:
                self.big_strings.append((self.str_start, self.str_start + length))

    def _is_data_uri(self) -> bool:
        return self.str_head[:5].lower() == b"data:"

    def _check_text(self) -> None:
        open_data = self.pos - self.str_start if self.in_string and not self.str_key and self._is_data_uri() else 0
        if self.pos - self.data_bytes - open_data > self.max_text:
            where = "a text value is longer than" if self.in_string and not open_data else "request JSON exceeds"
            raise self._refuse(413, f"{where} the {self.max_text} byte limit for JSON besides data URIs "
                                    "(VACE_MAX_JSON_TEXT_BYTES; send media as URLs, data URIs or uploads)",
                               "json_too_large")


def shape_for(settings: Settings) -> JsonShape:
    return JsonShape(settings.max_json_depth, settings.max_json_values, settings.max_json_text_bytes)


# ---- parsing a checked body -------------------------------------------------------------------------------

def _decode_big(view: memoryview) -> str:
    """A big data-URI string's bytes as str, in steps (each step lets the event loop's thread run)."""
    parts = []
    for k in range(0, len(view), _DECODE_STEP):
        parts.append(str(view[k:k + _DECODE_STEP], "utf-8"))
    return "".join(parts)


def parse_json(buf: bytes | bytearray, big: list[tuple[int, int]] | None = None) -> Any:
    """`json.loads` of a body whose big data-URI strings (offsets from JsonShape) are parsed separately: the
    skeleton holds short placeholders, replaced by the strings decoded in steps. Raises ValueError when the
    body is not valid JSON."""
    if not big:
        return json.loads(buf)
    nonce = secrets.token_hex(8)
    tag = f"\x00vace:{nonce}:"  # no JSON text decodes to this by chance: the nonce is new per call
    parts, prev = [], 0
    for k, (a, b) in enumerate(big):
        parts += [bytes(buf[prev:a]), f"\\u0000vace:{nonce}:{k}".encode()]
        prev = b
    parts.append(bytes(buf[prev:]))
    skeleton = json.loads(b"".join(parts))
    view = memoryview(buf)
    strings = {f"{tag}{k}": _decode_big(view[a:b]) for k, (a, b) in enumerate(big)}

    def put(node: Any) -> Any:
        if isinstance(node, str):
            return strings.pop(node, node) if node.startswith(tag) else node
        if isinstance(node, dict):
            return {k: put(v) for k, v in node.items()}
        if isinstance(node, list):
            return [put(v) for v in node]
        return node

    return put(skeleton)


#: What `read_json` returns for an empty body unless told otherwise.
MISSING: Any = object()


async def read_json(request: Request, empty: Any = MISSING) -> Any:
    """The body parsed off the event loop (see `parse_json`), `empty` when there is none; ValueError when it is
    not valid JSON."""
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
    if not buf:
        return empty
    shape: JsonShape | None = request.scope.get(SCOPE_KEY)
    big = shape.big_strings if shape is not None and not shape.in_string else []
    return await asyncio.to_thread(parse_json, buf, big)


# ---- the middleware ----------------------------------------------------------------------------------------

LOCAL_NAMES = ("localhost", "127.0.0.1", "[::1]")


def host_name(netloc: str) -> str:
    """`Host` / authority → its name, lower-case, without the port (`[::1]:8000` → `[::1]`)."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[: netloc.find("]") + 1] if "]" in netloc else netloc
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


class RequestGuard:
    """ASGI middleware: the key-less Host/Origin check, then each route's body policy as the route reads its body
    (the router has set `scope["endpoint"]` by then). `render` draws an ApiError in the owning dialect's shape."""

    def __init__(self, app: Any, settings: Settings, render: Callable[[Request, ApiError], Response]) -> None:
        self.app = app
        self.settings = settings
        self.render = render
        names = {*LOCAL_NAMES, *(n.strip().lower() for n in settings.server_names)}
        bound = settings.host.strip("[]")
        names.add(host_name(f"[{bound}]" if ":" in bound else bound))
        origins = {o.strip().lower().rstrip("/") for o in settings.allowed_origins}
        if settings.public_base_url:
            u = urlsplit(settings.public_base_url)
            names.add(host_name(u.netloc))
            origins.add(f"{u.scheme}://{u.netloc}".lower())
        self.names, self.origins = names, origins
        self.check_sites = not settings.auth_enabled

    def site_problem(self, scope: dict[str, Any], headers: dict[bytes, bytes]) -> str | None:
        """Why a key-less server refuses this request (None: it may go on)."""
        host = headers.get(b"host", b"").decode("latin-1")
        server = scope.get("server") or ("", 0)
        name = host_name(host)
        bound = host_name(f"[{server[0]}]" if ":" in str(server[0]) else str(server[0]))
        if "*" not in self.names and name not in self.names and name != bound:
            return (f"Host '{host[:100]}' is not a name this key-less server serves (accepted: "
                    f"{', '.join(sorted(self.names))}; add names with VACE_SERVER_NAMES)")
        origin = headers.get(b"origin")
        if origin is None or "*" in self.origins:
            return None
        o = origin.decode("latin-1").strip().lower().rstrip("/")
        if o in self.origins:
            return None
        u = urlsplit(o)
        if u.scheme in ("http", "https") and u.netloc == host.strip().lower() and host_name(u.netloc) in (
                *self.names, bound):
            return None  # the server's own pages (the playground)
        return (f"Origin '{o[:100]}' may not call this key-less server (only its own pages may; add origins with "
                "VACE_ALLOWED_ORIGINS, or configure API keys)")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        if self.check_sites and (problem := self.site_problem(scope, headers)):
            etype = "forbidden_origin" if problem.startswith("Origin") else "forbidden_host"
            response = self.render(Request(scope), ApiError(403, problem, error_type=etype))
            await response(scope, receive, send)
            return
        await self.app(scope, self._guarded(scope, headers, receive), send)

    def _guarded(self, scope: dict[str, Any], headers: dict[bytes, bytes], receive: Any) -> Any:
        """`receive` with the route's policy applied to the body; checked from the first message that carries
        one (a request without a body, or a route that never reads it, is not held to a content type)."""
        settings = self.settings
        state: dict[str, Any] = {}

        def start() -> None:
            policy = policy_of(scope.get("endpoint")) or DEFAULT
            ctype = headers.get(b"content-type", b"").decode("latin-1")
            kind = content_kind(ctype)
            if policy.content is not None and kind not in policy.content:
                shown = f"Content-Type '{ctype[:100]}'" if ctype else "a body without a Content-Type"
                raise BodyRefused(415, f"{shown} is not accepted here; send "
                                       f"{' or '.join(_MEDIA_TYPES[k] for k in policy.content)}",
                                  "unsupported_media_type")
            limit = policy.max_bytes(settings)
            declared = headers.get(b"content-length", b"")
            if declared.isdigit() and int(declared) > limit:
                raise BodyRefused(413, f"request body of {int(declared)} bytes exceeds this route's {limit} byte "
                                       "limit (send large media as URLs or uploads)", "too_large")
            state["limit"], state["seen"] = limit, 0
            if kind == "json":
                scope[SCOPE_KEY] = state["shape"] = shape_for(settings)

        async def guarded() -> dict[str, Any]:
            msg = await receive()
            if msg["type"] != "http.request":
                return msg
            body = msg.get("body", b"")
            if not state:
                if not body and not msg.get("more_body"):
                    return msg
                start()
            state["seen"] += len(body)
            if state["seen"] > state["limit"]:
                raise BodyRefused(413, f"request body exceeds this route's {state['limit']} byte limit (send large "
                                       "media as URLs or uploads)", "too_large")
            if (shape := state.get("shape")) is not None:
                shape.feed(body)
            return msg

        return guarded


_MEDIA_TYPES = {"json": "application/json", "multipart": "multipart/form-data",
                "form": "application/x-www-form-urlencoded"}
