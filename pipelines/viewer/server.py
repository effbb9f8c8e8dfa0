"""The viewer's local web server: read-only, token-guarded, one thread per connection.

Like Jupyter's, it binds 127.0.0.1 and prints a URL with a random token; the token is accepted as
``?token=`` (then kept in an HttpOnly cookie) or the cookie. The Host header must name the server
(``127.0.0.1``, ``localhost`` or a host given with ``--allow-host``; any port, as an SSH tunnel or a
proxy forwards from its own), so a web page on another origin cannot reach it through DNS rebinding.
Only GET and HEAD are answered; every other method gets 405.
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from pipelines.viewer.content import NotFound, ViewerContent

log = logging.getLogger(__name__)
COOKIE = "wsi_viewer_token"
CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
LOCAL_HOSTS = ("127.0.0.1", "localhost")
TOKEN = re.compile(r"[A-Za-z0-9_-]{16,}")
TEXT = "text/plain; charset=utf-8"


class ViewerServer(ThreadingHTTPServer):
    """An HTTP server for one run's :class:`ViewerContent`."""

    daemon_threads = True
    request_queue_size = 64  # OpenSeadragon asks for many tiles at once

    def __init__(self, content: ViewerContent, host: str = "127.0.0.1", port: int = 0, *, token: str | None = None,
                 allow_hosts: tuple[str, ...] = ()):
        if token is not None and not TOKEN.fullmatch(token):
            raise ValueError("the viewer's token must be at least 16 characters of letters, digits, '-' and '_'")
        super().__init__((host, port), ViewerHandler)
        self.content = content
        self.token = token if token is not None else secrets.token_urlsafe(24)
        self.cookie = f"{COOKIE}_{self.server_address[1]}"  # per port: another viewer on this machine keeps its own
        names = set(LOCAL_HOSTS) | set(allow_hosts) | ({host} if host not in ("0.0.0.0", "") else set())
        self.allowed_hosts = {n.lower().rstrip(".") for n in names}

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = "127.0.0.1" if host == "0.0.0.0" else host
        return f"http://{shown}:{port}/?token={self.token}"

    def start(self) -> threading.Thread:
        """Serve in a background thread (tests, benchmarks); ``shutdown()`` stops it."""
        thread = threading.Thread(target=self.serve_forever, name="wsi-viewer", daemon=True)
        thread.start()
        return thread


def host_name(header: str) -> str:
    """The name in a Host header, without its port (a tunnel or proxy may forward from any port)."""
    header = header.strip().lower()
    if header.startswith("["):  # [v6]:port
        return header[: header.find("]") + 1]
    return header.rsplit(":", 1)[0].rstrip(".") if header.count(":") == 1 else header.rstrip(".")


def cookie_value(header: str, name: str) -> str | None:
    """One cookie's value, read by hand: ``http.cookies`` stops at the first cookie it cannot parse, and
    other applications on localhost set such cookies."""
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value.strip().strip('"')
    return None


class ViewerHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a viewer's hundreds of tile requests reuse a few connections
    disable_nagle_algorithm = True  # headers and body go out at once: with Nagle, keep-alive waits 40 ms per answer
    server_version = "wsi-pipeline-viewer"
    server: ViewerServer

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def __getattr__(self, name: str):
        if name.startswith("do_"):  # any other method (POST, PUT, OPTIONS, TRACE, PROPFIND…): 405, not 501
            return self._refuse
        raise AttributeError(name)

    def _refuse(self) -> None:
        self.close_connection = True  # its body is not read: the connection cannot carry another request
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"read-only: only GET and HEAD\n", TEXT, True, extra={"Allow": "GET, HEAD"})

    def _answer(self, body: bool) -> None:
        if host_name(self.headers.get("Host") or "") not in self.server.allowed_hosts:
            self._send(HTTPStatus.FORBIDDEN, b"forbidden: unknown Host\n", TEXT, body)
            return
        url = urlsplit(self.path)
        offered = parse_qs(url.query).get("token", [""])[0]
        token = self.server.token.encode()
        from_query = hmac.compare_digest(offered.encode(), token)
        cookie = cookie_value(self.headers.get("Cookie", ""), self.server.cookie) or ""
        if not from_query and not hmac.compare_digest(cookie.encode(), token):
            self._send(HTTPStatus.FORBIDDEN, b"forbidden: open the URL with its ?token= that `wsi-pipeline view` printed\n",
                       TEXT, body)
            return
        path = unquote(url.path)
        if from_query:
            set_cookie = f"{self.server.cookie}={self.server.token}; HttpOnly; SameSite=Strict; Path=/"
            if path in ("/", "/index.html"):  # the page: once the cookie is set, off the address bar and history
                self._send(HTTPStatus.FOUND, b"", TEXT, body, extra={"Set-Cookie": set_cookie, "Location": "/"})
                return
        try:
            data, ctype = self.server.content.get(path)
        except NotFound as exc:
            self._send(HTTPStatus.NOT_FOUND, f"not found: {exc.args[0] if exc.args else url.path}\n".encode(), TEXT, body)
            return
        except Exception:  # a slide that fails to read: logged here, never a traceback to the browser
            log.exception("viewer: %s failed", url.path)
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error (see the server's log)\n", TEXT, body)
            return
        # every image URL carries the run's version (?v=): a day's caching never shows another run's or an older tile
        cache = "private, max-age=86400" if ctype.startswith("image/") else "no-cache"
        self._send(HTTPStatus.OK, data, ctype, body, extra={"Cache-Control": cache})

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
