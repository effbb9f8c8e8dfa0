"""The viewer's local web server: read-only, token-guarded, one thread per connection.

Like Jupyter's, it binds 127.0.0.1 and prints a URL with a random token; the token is accepted as
``?token=`` (then kept in an HttpOnly cookie) or the cookie. The Host header must name the server
(``127.0.0.1``, ``localhost`` or a host given with ``--allow-host``), so a web page on another origin
cannot reach it through DNS rebinding. Only GET and HEAD are answered; every other method gets 405.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from pipelines.viewer.content import NotFound, ViewerContent

log = logging.getLogger(__name__)
COOKIE = "wsi_viewer_token"
CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")


class ViewerServer(ThreadingHTTPServer):
    """An HTTP server for one run's :class:`ViewerContent`."""

    daemon_threads = True
    request_queue_size = 64  # OpenSeadragon asks for many tiles at once

    def __init__(self, content: ViewerContent, host: str = "127.0.0.1", port: int = 0, *, token: str | None = None,
                 allow_hosts: tuple[str, ...] = ()):
        super().__init__((host, port), ViewerHandler)
        self.content = content
        self.token = token if token is not None else secrets.token_urlsafe(24)
        port = self.server_address[1]
        names = set(LOCAL_HOSTS) | set(allow_hosts) | ({host} if host not in ("0.0.0.0", "::", "") else set())
        self.allowed_hosts = {n.lower() for n in names} | {f"{n}:{port}".lower() for n in names}

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        return f"http://{shown}:{port}/?token={self.token}"

    def start(self) -> threading.Thread:
        """Serve in a background thread (tests, benchmarks); ``shutdown()`` stops it."""
        thread = threading.Thread(target=self.serve_forever, name="wsi-viewer", daemon=True)
        thread.start()
        return thread


class ViewerHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a viewer's hundreds of tile requests reuse a few connections
    disable_nagle_algorithm = True  # headers and body go out at once: with Nagle, keep-alive waits 40 ms per answer
    server_version = "wsi-pipeline-viewer"
    server: ViewerServer

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _refuse(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"read-only: only GET and HEAD\n", "text/plain; charset=utf-8", True,
                   extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse

    def _cookie_token(self) -> str | None:
        try:
            morsel = SimpleCookie(self.headers.get("Cookie", "")).get(COOKIE)
        except CookieError:
            return None
        return morsel.value if morsel else None

    def _answer(self, body: bool) -> None:
        host = (self.headers.get("Host") or "").strip().lower()
        if host not in self.server.allowed_hosts:
            self._send(HTTPStatus.FORBIDDEN, b"forbidden: unknown Host\n", "text/plain; charset=utf-8", body)
            return
        url = urlsplit(self.path)
        offered = parse_qs(url.query).get("token", [None])[0]
        token = self.server.token
        from_query = offered is not None and hmac.compare_digest(offered.encode(), token.encode())
        cookie = self._cookie_token()
        if not from_query and not (cookie is not None and hmac.compare_digest(cookie.encode(), token.encode())):
            self._send(HTTPStatus.FORBIDDEN, b"forbidden: open the URL with its ?token= that `wsi-pipeline view` printed\n",
                       "text/plain; charset=utf-8", body)
            return
        extra = {"Set-Cookie": f"{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"} if from_query else {}
        try:
            data, ctype = self.server.content.get(unquote(url.path))
        except NotFound as exc:
            self._send(HTTPStatus.NOT_FOUND, f"not found: {exc.args[0] if exc.args else url.path}\n".encode(),
                       "text/plain; charset=utf-8", body)
            return
        except Exception:  # a slide that fails to read: logged here, never a traceback to the browser
            log.exception("viewer: %s failed", url.path)
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error (see the server's log)\n", "text/plain; charset=utf-8", body)
            return
        cache = "private, max-age=86400" if ctype.startswith("image/") else "no-cache"
        self._send(HTTPStatus.OK, data, ctype, body, extra={**extra, "Cache-Control": cache})

    def _send(self, status: HTTPStatus, data: bytes, ctype: str, body: bool, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")  # the token never leaves in a Referer
        self.send_header("Content-Security-Policy", CSP)
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:
        log.debug("viewer: " + format, *args)
