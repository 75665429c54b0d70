"""One gate in front of every route (API, /v1, /ui and Gradio's internals, /docs, /metrics), before any of them runs.

In order:
1. Host: only the names the server is bound to (plus --allowed-host). A web page that rebinds its own domain name
   to 127.0.0.1 sends its own name as Host and is refused, so it cannot read the history or start jobs.
2. Token (when set): `Authorization: Bearer TOKEN`, or the cookie that `?token=TOKEN` sets once in a browser. The
   cookie holds an HMAC of the token, never the token; it is HttpOnly, SameSite=Strict, and Secure over TLS.
3. Origin: a request whose Origin is not this server's own (a page elsewhere) is refused unless it carries the
   token in its Authorization header, which a browser never adds by itself. Cross-site form posts and uploads end
   here; so does Gradio's echoing of other local origins.
4. Bodies: at most BODY_LIMIT_BYTES (UPLOAD_LIMIT_BYTES for the UI's upload route, `input_body_limit` for the
   routes that take pictures: multipart uploads, A1111's base64 JSON), with a Content-Length: refused before a byte
   of the body is read.
5. Gradio's file routes: only images by name, from the outputs folder or the UI's own copies of them.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..params import MAX_INPUT_BYTES
from .inputs import IMAGE_NAME

TOKEN_COOKIE = "zstudio_session"
REFUSED_HEADER = "X-Zstudio-Refused"  # on the gate's own refusals, naming the check
MIN_TOKEN_LENGTH = 16
BODY_LIMIT_BYTES = 1 * 2**20
UPLOAD_LIMIT_BYTES = 20 * 2**20
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}
FILE_ROUTE = re.compile(r"^/ui(/gradio_api)?/file[=/](?P<path>.*)$", re.DOTALL)
NEEDS_TOKEN = "a valid token is required (Authorization: Bearer TOKEN, or ?token=TOKEN in the browser)"
USE_HEADER = "send the token in an Authorization header"
UPLOAD_ROUTE = re.compile(r"^/ui(/gradio_api)?/upload/?$")
# Routes that take pictures: uploaded as multipart, or (A1111's) base64 inside JSON. Other bodies stay small.
INPUT_ROUTE = re.compile(r"^/(api/v1/(generations|upscales)|v1/images/edits)/?$")
BASE64_INPUT_ROUTE = re.compile(r"^/sdapi/v1/(img2img|extra-single-image)/?$")


def input_body_limit(max_input_bytes: int) -> int:
    """A body that carries pictures: an image and its mask, base64-encoded (4/3 of their bytes), and the fields."""
    return 3 * max_input_bytes + BODY_LIMIT_BYTES


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name in a Host header, lower-cased, without the port ("[::1]:7860" -> "::1")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


@dataclass(frozen=True)
class HostPolicy:
    """The Host names a server answers to. IP literals cannot be rebound by DNS, so a server bound to every
    interface accepts any of its addresses typed as a number."""

    names: frozenset[str]
    any_ip: bool = False

    @classmethod
    def for_bind(cls, host: str, extra: Iterable[str] = ()) -> HostPolicy:
        host = host.strip("[]").lower()
        names = {host_name(name) for name in extra}
        wildcard = host in ("0.0.0.0", "::", "")
        if wildcard or is_loopback(host):
            names |= {"localhost", "127.0.0.1", "::1"}
        if wildcard:
            names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        else:
            names.add(host)
        return cls(frozenset(names), any_ip=wildcard)

    def allows(self, header: str) -> bool:
        name = host_name(header)
        if name in self.names:
            return True
        if not self.any_ip:
            return False
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True


class Refused(Exception):
    """A request the gate turns away; `check` names which check (host, token, origin, body, file)."""

    def __init__(self, check: str, status: int, message: str):
        super().__init__(message)
        self.check = check
        self.status = status
        self.message = message


def session_value(token: str) -> str:
    """What the browser's cookie holds: an HMAC of the token (the token itself never sits in the cookie jar)."""
    return hmac.new(token.encode(), b"zstudio browser session v1", hashlib.sha256).hexdigest()


class AccessGuard:
    """Pure ASGI middleware (it leaves streaming and disconnect detection untouched)."""

    def __init__(self, app: ASGIApp, hosts: HostPolicy, token: str | None, file_roots: Callable[[], list[Path]],
                 input_limit: int = input_body_limit(MAX_INPUT_BYTES),
                 upload_roots: Callable[[], list[Path]] = list):  # fmt: skip
        self.app = app
        self.input_limit = input_limit
        self.hosts = hosts
        self.token = token
        self.session = session_value(token) if token else None
        self.file_roots = file_roots
        self.upload_roots = upload_roots

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        try:
            from_query = self.check(scope, Headers(scope=scope))
        except Refused as refusal:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008, "reason": refusal.message[:120]})
                return
            extra = {REFUSED_HEADER: refusal.check}
            if refusal.status == 401:
                extra["WWW-Authenticate"] = "Bearer"
            await JSONResponse({"error": refusal.message}, refusal.status, headers=extra)(scope, receive, send)
            return
        if not from_query:
            await self.app(scope, receive, send)
            return
        secure = scope.get("scheme") in ("https", "wss")

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                cookie = SimpleCookie()
                cookie[TOKEN_COOKIE] = self.session
                cookie[TOKEN_COOKIE].update({"httponly": True, "samesite": "Strict", "path": "/", "secure": secure})
                MutableHeaders(scope=message).append("set-cookie", cookie[TOKEN_COOKIE].OutputString())
            await send(message)

        await self.app(scope, receive, send_with_cookie)

    def check(self, scope: Scope, headers: Headers) -> bool:
        """Raise `Refused`, or say whether the request was let in by ?token= (then the session cookie is set)."""
        host = headers.get("host", "")
        if not self.hosts.allows(host):
            raise Refused("host", 400, f"Host {_shown(host_name(host))} is not a name this server answers to; "
                               "add it with --allowed-host")  # fmt: skip
        bearer = from_query = False
        if self.token:
            bearer = self._matches(_bearer(headers), self.token)
            session = _cookie(headers, TOKEN_COOKIE)
            query = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[0]
            from_query = not bearer and self._matches(query, self.token)
            if not (bearer or from_query or self._matches(session, self.session)):
                raise Refused("token", 401, NEEDS_TOKEN)
        origin = headers.get("origin")
        if not bearer:
            if origin is not None and _netloc(origin) != host.strip().lower():
                raise Refused("origin", 403, f"cross-origin request from {_shown(origin)} refused; {USE_HEADER}")
            if scope.get("method") in STATE_CHANGING and headers.get("sec-fetch-site") == "cross-site":
                raise Refused("origin", 403, f"cross-site request refused; {USE_HEADER}")
        path = scope.get("path", "")
        if scope.get("method") in STATE_CHANGING or "content-length" in headers:
            self._check_body(path, headers)
        match = FILE_ROUTE.match(path)
        if match and not self._servable(match["path"]):
            raise Refused("file", 404, "not found: only generated images and uploaded pictures are served")
        return from_query

    @staticmethod
    def _matches(given: str | None, expected: str | None) -> bool:
        return bool(given and expected) and hmac.compare_digest(given.encode(), expected.encode())

    def _check_body(self, path: str, headers: Headers) -> None:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise Refused("body", 411, "send a Content-Length (chunked request bodies are not accepted)")
        limit = BODY_LIMIT_BYTES
        if UPLOAD_ROUTE.match(path):
            limit = UPLOAD_LIMIT_BYTES
        elif BASE64_INPUT_ROUTE.match(path) or (
            INPUT_ROUTE.match(path) and headers.get("content-type", "").lower().startswith("multipart/form-data")
        ):
            limit = self.input_limit
        length = headers.get("content-length", "0")
        if not length.isascii() or not length.isdigit():
            raise Refused("body", 400, f"Content-Length {_shown(length)} is not a number of bytes")
        if int(length) > limit:
            raise Refused("body", 413, f"the request body is {int(length)} bytes; at most {limit} are accepted here")

    def _servable(self, requested: str) -> bool:
        """Gradio's file route may serve an image by its generated name from the outputs folder or the UI's copies,
        and, from Gradio's upload cache, a file that is a PNG, JPEG or WebP picture by its first bytes (what a
        browser uploaded into an image box, shown back in that box)."""
        if "://" in requested:
            return False
        try:
            path = Path(requested).resolve()
        except (OSError, ValueError):
            return False
        if IMAGE_NAME.match(path.name) and any(path.is_relative_to(root) for root in self.file_roots()):
            return True
        return any(path.is_relative_to(root) for root in self.upload_roots()) and _is_picture(path)


PICTURE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")  # PNG, JPEG; WebP: RIFF....WEBP


def _is_picture(path: Path) -> bool:
    """A PNG, JPEG or WebP file by its name and its first bytes (never by the name alone)."""
    if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp") or not path.is_file():
        return False
    try:
        with path.open("rb") as handle:
            head = handle.read(12)
    except OSError:
        return False
    return head.startswith(PICTURE_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _bearer(headers: Headers) -> str:
    scheme, _, value = headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def _cookie(headers: Headers, name: str) -> str:
    cookie = SimpleCookie()
    try:
        cookie.load(headers.get("cookie", ""))
    except Exception:  # a malformed Cookie header is the same as none
        return ""
    return cookie[name].value if name in cookie else ""


def _shown(text: str) -> str:
    """Untrusted header text, quoted, short and ASCII."""
    return repr(text[:100].encode("ascii", "backslashreplace").decode())


def _netloc(origin: str) -> str:
    try:
        return urlsplit(origin.strip()).netloc.lower()
    except ValueError:
        return ""
