"""A loopback HTTP file server for download tests (127.0.0.1 only): Range requests, dropped
connections on demand, a record of every request."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Served:
    """One file: its bytes, its content type, and how many of its next responses are cut short."""

    data: bytes
    content_type: str = "application/octet-stream"
    cut_bytes: int = 0  # a cut response sends this many bytes of its body, then drops the connection
    cuts_left: int = 0
    ranges: bool = True  # honour Range requests (else always answer with the whole file)
    etag: bool = True  # send an ETag (the sha256 of the data, quoted)
    range_shift: int = 0  # answer Range requests from this many bytes later than asked (a broken server)


@dataclass
class Request:
    method: str
    path: str
    headers: dict
    status: int = 0
    sent: int = 0


@dataclass
class FileServer:
    files: dict[str, Served] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    extra_headers: dict[str, dict[str, str]] = field(default_factory=dict)  # path -> headers added to its answers
    _httpd: ThreadingHTTPServer | None = None

    def add(self, path: str, data: bytes, **how) -> str:
        """Serve ``data`` at ``path``; its URL."""
        self.files[path] = Served(data, **how)
        return self.url(path)

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}{path}"

    def gets(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == "GET" and r.path == path]

    def start(self) -> "FileServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

            def _answer(self, body: bool):
                record = Request(self.command, self.path.split("?")[0], dict(self.headers))
                server.requests.append(record)
                served = server.files.get(record.path)
                if served is None:
                    record.status = 404
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data, first = served.data, 0
                etag = '"' + hashlib.sha256(data).hexdigest() + '"'
                wanted = self.headers.get("Range")
                if_range = self.headers.get("If-Range")
                if wanted and served.ranges and (if_range is None or if_range == etag):
                    first = int(wanted.removeprefix("bytes=").split("-")[0]) + served.range_shift
                    if first >= len(data):
                        record.status = 416
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {first}-{len(data) - 1}/{len(data)}")
                    record.status = 206
                else:
                    self.send_response(200)
                    record.status = 200
                self.send_header("Content-Type", served.content_type)
                self.send_header("Content-Length", str(len(data) - first))
                if served.etag:
                    self.send_header("ETag", etag)
                self.send_header("Accept-Ranges", "bytes" if served.ranges else "none")
                for key, value in server.extra_headers.get(record.path, {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if not body:
                    return
                chunk = data[first:]
                if served.cuts_left > 0:
                    served.cuts_left -= 1
                    chunk = chunk[: served.cut_bytes]
                    self.close_connection = True
                self.wfile.write(chunk)
                self.wfile.flush()
                record.sent = len(chunk)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
