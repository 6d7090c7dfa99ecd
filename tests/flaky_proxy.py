"""A fault-injecting HTTP reverse proxy in front of the tests' S3 server or GCS emulator.

Runs in the test process, on a thread, on a free loopback port. Every request (method, path,
query, headers, body) is forwarded to the upstream server and its answer (status, headers,
body) relayed back, except the ones a rule fails: those get the store's own retryable error,
HTTP 503 (S3's ``SlowDown``, GCS's ``backendError``), and never reach the server. The ``Host``
header is forwarded as the client sent it (the client signed for the proxy's host); the
tests' S3 server does not check signatures.

  with FlakyProxy(stores.env["AWS_ENDPOINT_URL"]) as proxy:
    os.environ["AWS_ENDPOINT_URL"] = proxy.url
    proxy.fail(writes_under("checkpoints/"), times=3)   # the next 3 such requests fail
    proxy.fail(writes_under("checkpoints/"))            # every such request fails
    proxy.fail(key_endswith("metrics.jsonl"), after=2)  # all but the next 2 fail
    proxy.heal()
    proxy.count(writes_under("checkpoints/"), failed=True)
"""

from __future__ import annotations

import http.client
import sys
import threading
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

# Headers that belong to one connection, not to the request: never forwarded.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
              "trailer", "upgrade", "expect", "content-length"}
SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message>"
             b"<RequestId>FLAKYPROXY</RequestId></Error>")
GCS_UNAVAILABLE = (b'{"error": {"code": 503, "message": "Backend Error", "errors": '
                   b'[{"reason": "backendError", "message": "Backend Error"}]}}')
GCS_API = ("/storage/v1/b/", "/upload/storage/v1/b/")


@dataclass(frozen=True)
class Request:
  method: str
  path: str   # the URL path, decoded: /<bucket>/<key> (path-style addressing)
  query: str

  @property
  def gcs(self) -> bool:
    return self.path.startswith(GCS_API)

  @property
  def key(self) -> str:
    """The object's name: S3's path less the bucket; GCS's ``name`` parameter or the path
    after ``/o/`` (empty when the request names no object in its URL)."""
    if self.gcs:
      name = urllib.parse.parse_qs(self.query).get("name", [""])[0]
      return name or (self.path.split("/o/", 1)[1] if "/o/" in self.path else "")
    parts = self.path.lstrip("/").split("/", 1)
    return parts[1] if len(parts) > 1 else ""


Matcher = Callable[[Request], bool]


def writes_under(prefix: str) -> Matcher:
  """Uploads (PUT, and POST: S3's multipart uploads, GCS's uploads) of objects whose key has a
  path segment starting with ``prefix`` (``"checkpoints/"`` matches ``run/checkpoints/2/x``)."""
  def match(r: Request) -> bool:
    return r.method in ("PUT", "POST") and ("/" + r.key).find("/" + prefix) >= 0
  return match


def key_endswith(suffix: str, methods: tuple[str, ...] = ("PUT", "POST")) -> Matcher:
  return lambda r: r.method in methods and r.key.endswith(suffix)


class FlakyProxy:
  """The proxy; :meth:`fail` and :meth:`heal` change its rules while it runs, and
  :attr:`log` holds every request as ``(Request, status, failed_here)``."""

  def __init__(self, upstream: str):
    parsed = urllib.parse.urlparse(upstream)
    self.upstream = (parsed.hostname, parsed.port or 80)
    self._lock = threading.Lock()
    self._rules: list[list] = []  # [matcher, to let through first, to fail (None: all)]
    self.log: list[tuple[Request, int, bool]] = []
    proxy = self

    class Handler(BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"  # keep-alive, as the clients expect

      def log_message(self, *args):  # quiet
        pass

      def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
          out = bytearray()
          while True:
            size = int(self.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
              while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
              return bytes(out)
            out += self.rfile.read(size)
            self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

      def _handle(self):
        body = self._body()
        split = urllib.parse.urlsplit(self.path)
        request = Request(self.command, urllib.parse.unquote(split.path), split.query)
        if proxy._should_fail(request):
          error, kind = ((GCS_UNAVAILABLE, "application/json") if request.gcs else
                         (SLOW_DOWN, "application/xml"))
          proxy._record(request, 503, True)  # before the client can see the answer
          self.send_response(503, "Service Unavailable")
          self.send_header("Content-Type", kind)
          self.send_header("Content-Length", str(len(error)))
          self.end_headers()
          if self.command != "HEAD":
            self.wfile.write(error)
          return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
        try:
          conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
          for k, v in headers.items():
            conn.putheader(k, v)
          if body or self.command in ("PUT", "POST"):
            conn.putheader("Content-Length", str(len(body)))
          conn.endheaders(body or None)
          response = conn.getresponse()
          data = response.read()
          proxy._record(request, response.status, False)
          self.send_response(response.status, response.reason)
          for k, v in response.getheaders():
            if k.lower() not in HOP_BY_HOP:
              self.send_header(k, v)
          if self.command == "HEAD":
            length = response.getheader("Content-Length")
            if length is not None:
              self.send_header("Content-Length", length)
          else:
            self.send_header("Content-Length", str(len(data)))
          self.end_headers()
          if self.command != "HEAD":
            self.wfile.write(data)
        finally:
          conn.close()

      do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    class Server(ThreadingHTTPServer):
      daemon_threads = True

      def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that went away
          super().handle_error(request, client_address)

    self.server = Server(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
    self._thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                    name="flaky-proxy")
    self._thread.start()

  def fail(self, match: Matcher, times: int | None = None, after: int = 0) -> None:
    """Answers ``times`` requests that ``match`` (all of them if None), after letting the
    next ``after`` through, with 503 SlowDown instead of forwarding them."""
    with self._lock:
      self._rules.append([match, after, times])

  def heal(self) -> None:
    """Forwards every request again."""
    with self._lock:
      self._rules.clear()

  def _should_fail(self, request: Request) -> bool:
    with self._lock:
      for rule in self._rules:
        match, through, remaining = rule
        if remaining == 0 or not match(request):
          continue
        if through > 0:
          rule[1] = through - 1
          return False
        if remaining is not None:
          rule[2] = remaining - 1
        return True
    return False

  def _record(self, request: Request, status: int, failed: bool) -> None:
    with self._lock:
      self.log.append((request, status, failed))

  def count(self, match: Matcher | None = None, failed: bool | None = None) -> int:
    """How many requests (that ``match``; failed here, or forwarded) the proxy has seen."""
    with self._lock:
      return sum(1 for r, _, f in self.log
                 if (match is None or match(r)) and (failed is None or f == failed))

  def close(self) -> None:
    self.server.shutdown()
    self.server.server_close()
    self._thread.join(10)

  def __enter__(self) -> "FlakyProxy":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
