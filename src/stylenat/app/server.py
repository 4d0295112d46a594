"""HTTP side of the latent explorer: a Starlette app serving the page and a small JSON API.

Every API call is a POST of a JSON object (or, for a projection, the raw image file) and answers
JSON; images travel as PNG data URLs, latents as base64 of little-endian float32 ws
``[num_ws, style_dim]``. Errors answer ``{"error": "..."}`` with 400 (bad value or Host), 403 (a
page of another origin asked), 413 (too large), 415 (not an accepted image), 503 (model busy).
Model work runs in the thread pool, so polling a projection stays quick while the model computes.

Routes: ``GET /`` the page, ``GET /static/...`` its script and style, ``GET /api/info``,
``POST /api/{image,grid,mix,interpolate,attention,edit}``, ``POST /api/project?steps=N[&class=K]``
(body: the image file), ``GET /api/project/{job}`` (progress, then the result),
``POST /api/project/{job}/stop``.

Numbers JSON cannot hold (a PSNR of inf for a perfect reconstruction, a NaN loss) are sent as the
strings "inf", "-inf" and "nan".

Sizes: ``/api/info`` gives the model's ``resolution`` (a square's edge, else [height, width]) and its
``width`` and ``height``; each attention row names its stage's ``width`` and ``height``; images are
PNGs of the model's W x H (attention cells: the image's aspect). Pixels are [y, x].
"""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import math
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Sequence
from importlib.resources import files

import numpy as np
import torch
from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from torch import Tensor

from stylenat.app.explorer import Busy, Explorer, Limits, ProjectionJob, decode_upload
from stylenat.errors import ConfigError, DataError, UserError
from stylenat.models.config import size_text

__all__ = ["create_app", "serve", "BackgroundServer", "listen", "loopback_hosts", "png_data_url", "encode_latent",
           "RequestGuard", "json_safe"]

STATIC = files("stylenat.app") / "static"
# Everything comes from this server: no CDN, font or style from elsewhere can load, even by mistake.
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                                 b"base-uri 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
LOOPBACK_NAMES = ["localhost", "127.0.0.1", "::1"]
DRAIN_FACTOR = 8  # an oversized body is read (and dropped) up to this many limits, so the browser gets the 413
# A Host header: a name or IPv4 address, or a bracketed IPv6 address, then an optional port.
HOST_HEADER = re.compile(r"(?:\[(?P<ip6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9._-]+))(?::(?P<port>[0-9]{1,5}))?")
DEFAULT_PORTS = {"http": 80, "https": 443}


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every response (the page, its files and the API).

    app: the ASGI app to wrap.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _host_name(name: str) -> str:
    """A host name as compared: IP addresses in their compressed form, names in lower case."""
    try:
        return ipaddress.ip_address(name).compressed
    except ValueError:
        return name.lower()


def parse_host(value: str) -> tuple[str, int | None] | None:
    """A Host header ("name", "name:port", "[v6]" or "[v6]:port") as (name, port or None); None if malformed.

    The name is in compared form (see :func:`_host_name`), without the brackets of an IPv6 address.
    """
    match = HOST_HEADER.fullmatch(value)
    if match is None:
        return None
    port = match["port"]
    if port is not None and not 0 < int(port) < 65536:
        return None
    return _host_name(match["ip6"] or match["name"]), None if port is None else int(port)


class RequestGuard:
    """Refuses what a page on another site could make a browser send to this server.

    - Host (DNS rebinding): the Host header's name must be one of ``allowed_hosts`` ("*": any);
      ports and the brackets of an IPv6 address are not part of the name. (Starlette's
      TrustedHostMiddleware splits the header on ":", so it refuses every "[::1]:port".)
    - Origin (cross-site requests): when a request carries an Origin header, as browsers send with
      every cross-origin request and every POST, it must be this server's own origin: the request's
      scheme, host and port. Requests without one (curl, urllib, scripts) are served.

    Refusals answer ``{"error": ...}``: 400 for the Host, 403 for the Origin.

    Args:
        app: the ASGI app to wrap. allowed_hosts: accepted Host names.
    """

    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str]) -> None:
        self.app = app
        self.any_host = "*" in allowed_hosts
        self.allowed = {_host_name(h.strip("[]")) for h in allowed_hosts if h != "*"}

    def refusal(self, scope: Scope) -> JSONResponse | None:
        """The response refusing this request, or None when it may go on."""
        headers = Headers(scope=scope)
        host_header = headers.get("host", "")
        host = parse_host(host_header)
        if not self.any_host and (host is None or host[0] not in self.allowed):
            return JSONResponse({"error": f"this server does not answer to the Host {host_header!r}; open it at "
                                          "its own address (e.g. http://127.0.0.1:PORT/)"}, status_code=400)
        origin = headers.get("origin")
        if origin is not None and not self._same_origin(origin, scope.get("scheme", "http"), host):
            return JSONResponse({"error": f"requests from pages of other origins are refused (Origin {origin!r})"},
                                status_code=403)
        return None

    @staticmethod
    def _same_origin(origin: str, scheme: str, host: tuple[str, int | None] | None) -> bool:
        """Whether the Origin header names scheme://host (default ports filled in on both sides)."""
        if host is None or "://" not in origin:  # "null" (sandboxed frames, files) is no origin
            return False
        origin_scheme, _, rest = origin.partition("://")
        theirs = parse_host(rest)
        if theirs is None or origin_scheme.lower() != scheme:
            return False
        default = DEFAULT_PORTS.get(scheme)
        return theirs[0] == host[0] and (theirs[1] or default) == (host[1] or default)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = self.refusal(scope) if scope["type"] in ("http", "websocket") else None
        if response is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await response(scope, receive, send)
        else:  # the app has no websocket route, but refuse before anything could answer one
            await send({"type": "websocket.close", "code": 1008})


# ---- encoding -----------------------------------------------------------------------------------


def png_data_url(image: Tensor | np.ndarray) -> str:
    """uint8 [3, H, W] -> "data:image/png;base64,..." (fast compression: the page is local)."""
    array = np.asarray(image).transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def encode_latent(ws: Tensor) -> str:
    """ws [num_ws, style_dim] -> base64 of little-endian float32."""
    return base64.b64encode(ws.detach().cpu().numpy().astype("<f4").tobytes()).decode()


def _decode_latent(text: object, explorer: Explorer) -> Tensor:
    g = explorer.g
    count = g.num_ws * g.style_dim
    try:
        raw = base64.b64decode(str(text), validate=True)
    except ValueError:
        raise ConfigError("a latent's ws must be base64 text") from None
    if len(raw) != 4 * count:
        raise ConfigError(f"a latent's ws must be {g.num_ws}x{g.style_dim} float32 values ({4 * count} bytes), "
                          f"got {len(raw)} bytes")
    return torch.from_numpy(np.frombuffer(raw, dtype="<f4").reshape(g.num_ws, g.style_dim).copy())


# ---- reading requests ---------------------------------------------------------------------------


async def _read_body(request: Request, limit: int, what: str) -> bytes:
    """The request body, or 413 naming the limit when it is larger."""
    declared = request.headers.get("content-length", "")
    size = int(declared) if declared.isdigit() else 0
    chunks, received = [], 0
    if size <= DRAIN_FACTOR * limit:  # far larger bodies are refused unread
        async for chunk in request.stream():
            received += len(chunk)
            if received > DRAIN_FACTOR * limit:
                break
            if received <= limit:
                chunks.append(chunk)
    size = max(size, received)
    if size > limit:
        raise HTTPException(413, f"the {what} is too large ({size / 2**20:.1f} MB; the limit is {limit / 2**20:g} MB)")
    return b"".join(chunks)


async def _json(request: Request) -> dict:
    body = await _read_body(request, request.app.state.explorer.limits.max_body_bytes, "request")
    try:
        data = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError("the request body must be a JSON object") from None
    if not isinstance(data, dict):
        raise ConfigError("the request body must be a JSON object")
    return data


def _int(body: dict, key: str, default: int | None = None) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    return value


def _float(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ConfigError(f"{key} must be a number in [{lo:g}, {hi:g}], got {value!r}")
    return float(value)


def _stage_names(body: dict, key: str) -> list[int | str]:
    """Stages as the attention takes them: each an integer (a stage's longer side) or "WxH" text."""
    value = body.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool))
                                              for v in value):
        raise ConfigError(f"{key} must be a list of stage sizes (integers, or \"WxH\" text), got {value!r}")
    return value


def _ints(body: dict, key: str, default: Sequence[int] | None = None) -> list[int]:
    value = body.get(key, default)
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{key} must be a list of integers, got {value!r}")
    return value


def _class(body: dict) -> int | None:
    return None if body.get("class") is None else _int(body, "class")


def _psi(body: dict) -> float:
    return _float(body, "psi", 1.0, -1.0, 2.0)


def _latent(body: dict, key: str, explorer: Explorer) -> int | Tensor:
    """A latent field: {"seed": N} or {"ws": base64 float32}."""
    value = body.get(key)
    if isinstance(value, dict) and "seed" in value:
        return explorer.check_seed(_int(value, "seed"))
    if isinstance(value, dict) and "ws" in value:
        return _decode_latent(value["ws"], explorer)
    raise ConfigError(f'{key} must be {{"seed": N}} or {{"ws": base64 float32 latent}}, got {value!r}')


def json_safe(value: object) -> object:
    """``value`` with every non-finite float (in dicts and lists too) as the string "inf", "-inf" or
    "nan": JSON has no such numbers, and JSONResponse refuses them (a 500 on every poll)."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# ---- endpoints ----------------------------------------------------------------------------------


async def page(request: Request) -> FileResponse:
    return FileResponse(str(STATIC / "index.html"), headers={"cache-control": "no-store"})


async def info(request: Request) -> JSONResponse:
    return JSONResponse(request.app.state.explorer.info())


async def image(request: Request) -> JSONResponse:
    ex, body = request.app.state.explorer, await _json(request)
    out = await run_in_threadpool(ex.image, _latent(body, "latent", ex), _psi(body), _class(body))
    return JSONResponse({"image": png_data_url(out)})


async def grid(request: Request) -> JSONResponse:
    ex, body = request.app.state.explorer, await _json(request)
    first, count = ex.check_seed(_int(body, "seed", 0)), _int(body, "count", 16)
    out = await run_in_threadpool(ex.grid, first, count, _psi(body), _class(body))
    return JSONResponse({"seeds": list(range(first, first + count)), "images": [png_data_url(x) for x in out]})


async def mix(request: Request) -> JSONResponse:
    ex, body = request.app.state.explorer, await _json(request)
    out = await run_in_threadpool(ex.mix, _latent(body, "a", ex), _latent(body, "b", ex), _ints(body, "layers"),
                                  _psi(body), _class(body))
    return JSONResponse({"images": [png_data_url(x) for x in out]})


async def interpolate(request: Request) -> JSONResponse:
    ex, body = request.app.state.explorer, await _json(request)
    out = await run_in_threadpool(ex.interpolate, _latent(body, "a", ex), _latent(body, "b", ex),
                                  _int(body, "frames", 16), _psi(body), _class(body))
    return JSONResponse({"frames": [png_data_url(x) for x in out]})


async def attention(request: Request) -> JSONResponse:
    ex, body = request.app.state.explorer, await _json(request)
    pixel = _ints(body, "pixel")
    if len(pixel) != 2:
        raise ConfigError(f"pixel must be [y, x], got {pixel!r}")
    stages = _stage_names(body, "resolutions") or None
    maps, cells, (rows, cols) = await run_in_threadpool(ex.attention, ex.check_seed(_int(body, "seed")),
                                                        tuple(pixel), stages, _psi(body), _class(body))
    out: list[dict] = []
    for m in maps:  # maps come stage by stage, block by block, group by group: the cells' row order
        if not out or (out[-1]["resolution"], out[-1]["block"]) != (m.resolution, m.block):
            h, w = m.weights.shape[-2:]  # the stage's map
            out.append({"resolution": m.resolution, "width": int(w), "height": int(h), "block": m.block,
                        "query": list(m.query), "image": png_data_url(cells[len(out) * cols]), "groups": []})
        row = out[-1]
        row["groups"].append({"group": m.group, "kernel": list(m.kernel), "dilation": list(m.dilation),
                              "heads": int(m.weights.shape[0]),
                              "image": png_data_url(cells[(len(out) - 1) * cols + 1 + len(row["groups"])])})
    return JSONResponse({"pixel": pixel, "rows": out})


async def edit(request: Request) -> JSONResponse:
    ex, body = request.app.state.explorer, await _json(request)
    strengths = body.get("strengths")
    if not isinstance(strengths, list) or not all(isinstance(s, (int, float)) and not isinstance(s, bool)
                                                  and math.isfinite(s) for s in strengths):
        raise ConfigError(f"strengths must be a list of numbers, got {strengths!r}")
    out = await run_in_threadpool(ex.edit, _latent(body, "latent", ex), strengths, str(body.get("group", "all")),
                                  _psi(body), _class(body))
    return JSONResponse({"image": png_data_url(out)})


def _query_int(request: Request, key: str, default: int | None) -> int | None:
    text = request.query_params.get(key)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{key} must be an integer, got {text!r}") from None


async def project_start(request: Request) -> JSONResponse:
    ex = request.app.state.explorer
    steps, cls = _query_int(request, "steps", 200), _query_int(request, "class", None)
    data = await _read_body(request, ex.limits.max_upload_bytes, "upload")
    target = await run_in_threadpool(decode_upload, data, ex.limits)
    return JSONResponse(_job_state(ex.start_projection(target, steps, cls)))


def _job_state(job: ProjectionJob) -> dict:
    """What the page shows of a job: progress, and the images and latent once done (JSON-safe)."""
    state = {"job": job.id, "state": job.state, "step": job.step, "steps": job.steps, "loss": job.loss,
             "error": job.error}
    if job.result is not None:
        r = job.result
        state.update(image=png_data_url(r.image), target=png_data_url(r.target), psnr=r.psnr, distance=r.distance,
                     latent=encode_latent(r.ws))
    return json_safe(state)


async def project_status(request: Request) -> JSONResponse:
    job = request.app.state.explorer.find_job(request.path_params["job"])
    return JSONResponse(_job_state(job), headers={"cache-control": "no-store"})


async def project_stop(request: Request) -> JSONResponse:
    job = request.app.state.explorer.find_job(request.path_params["job"])
    job.stop.set()
    return JSONResponse(_job_state(job))


# ---- errors -------------------------------------------------------------------------------------


def _error(status: int):
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        message = exc.detail if isinstance(exc, HTTPException) else " ".join(str(exc).split())
        return JSONResponse({"error": message}, status_code=getattr(exc, "status_code", status))

    return handler


def create_app(explorer: Explorer, allowed_hosts: Sequence[str] = ("*",)) -> Starlette:
    """The ASGI app of the explorer.

    Args:
        explorer: the model and its limits; fixed for the app's life (nothing in a request names a file).
        allowed_hosts: Host names accepted (DNS-rebinding guard; see :class:`RequestGuard`); "*" accepts any.
    """
    routes = [
        Route("/", page),
        Mount("/static", StaticFiles(packages=[("stylenat.app", "static")]), name="static"),
        Route("/api/info", info),
        Route("/api/image", image, methods=["POST"]),
        Route("/api/grid", grid, methods=["POST"]),
        Route("/api/mix", mix, methods=["POST"]),
        Route("/api/interpolate", interpolate, methods=["POST"]),
        Route("/api/attention", attention, methods=["POST"]),
        Route("/api/edit", edit, methods=["POST"]),
        Route("/api/project", project_start, methods=["POST"]),
        Route("/api/project/{job}", project_status),
        Route("/api/project/{job}/stop", project_stop, methods=["POST"]),
    ]
    handlers = {HTTPException: _error(500), Busy: _error(503), DataError: _error(415), UserError: _error(400)}
    middleware = [Middleware(SecurityHeaders), Middleware(RequestGuard, allowed_hosts=list(allowed_hosts))]
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)
    app.state.explorer = explorer
    return app


# ---- running ------------------------------------------------------------------------------------


def loopback_hosts(host: str) -> list[str]:
    """Host names to accept for a server bound to ``host``: the loopback names and ``host``
    itself, or any ("*") when it listens on every interface (then the user chose to open it)."""
    if host in ("0.0.0.0", "::", ""):
        return ["*"]
    return sorted({*LOOPBACK_NAMES, host})


def _bare(host: str) -> str:
    """An address as given on the command line, without the brackets of "[::1]"."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one); UserError saying why when it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)  # create_server's own text repeats the address
        raise UserError(f"cannot listen on {host}:{port} ({reason}); choose another --port or --host") from None


def _uvicorn(explorer: Explorer, host: str, port: int):
    """(listening socket, the app's base URL, a uvicorn server for it) on host:port."""
    import uvicorn

    host = _bare(host)
    sock = listen(host, port)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{sock.getsockname()[1]}"
    return sock, url, uvicorn.Server(uvicorn.Config(create_app(explorer, loopback_hosts(host)), log_level="warning"))


class BackgroundServer:
    """The explorer served by uvicorn in a background thread (notebooks, tests, benchmarks).

    Use as a context manager: entering starts it and waits until it answers; ``url`` is its base
    address; leaving stops it.

    Args:
        explorer: the model and its limits. host: address to bind. port: TCP port (0: a free one).
    """

    def __init__(self, explorer: Explorer, host: str = "127.0.0.1", port: int = 0) -> None:
        self.explorer = explorer
        self.sock, self.url, self.server = _uvicorn(explorer, host, port)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the explorer's server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def serve(g, host: str = "127.0.0.1", port: int = 7860, limits: Limits = Limits()) -> None:
    """Serve the explorer of generator ``g`` until interrupted (Ctrl-C).

    Args:
        g: a stylenat generator on its device. host: address to bind (loopback by default).
        port: TCP port (0: any free port). limits: the request limits.
    """
    host = _bare(host)
    sock, url, server = _uvicorn(Explorer(g, limits), host, port)
    print(f"stylenat serve: {url}/ ({size_text(g.resolution)}, {g.w_avg.device}; Ctrl-C stops)", flush=True)
    if not _is_loopback(host):
        print(f"stylenat serve: warning: listening on {host}: anyone who can reach this machine can use the app "
              "(there is no login)", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
