"""HTTP side of the latent explorer: a Starlette app serving the page and a small JSON API.

Every API call is a POST of a JSON object (or, for a projection, the raw image file) and answers
JSON; images travel as PNG data URLs, latents as base64 of little-endian float32 ws
``[num_ws, style_dim]``. Errors answer ``{"error": "..."}`` with 400 (bad value), 413 (too large),
415 (not an image), 503 (model busy). Model work runs in the thread pool, so polling a projection
stays quick while the model computes.

Routes: ``GET /`` the page, ``GET /static/...`` its script and style, ``GET /api/info``,
``POST /api/{image,grid,mix,interpolate,attention,edit}``, ``POST /api/project?steps=N`` (body: the
image file), ``GET /api/project/{job}`` (progress, then the result), ``POST /api/project/{job}/stop``.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import math
import os
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
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from torch import Tensor

from stylenat.app.explorer import Busy, Explorer, Limits, ProjectionJob, decode_upload
from stylenat.errors import ConfigError, DataError, UserError

__all__ = ["create_app", "serve", "BackgroundServer", "listen", "loopback_hosts", "png_data_url", "encode_latent"]

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
    stages = _ints(body, "resolutions", []) or None
    maps, cells, (rows, cols) = await run_in_threadpool(ex.attention, ex.check_seed(_int(body, "seed")),
                                                        tuple(pixel), stages, _psi(body), _class(body))
    out: list[dict] = []
    for m in maps:  # maps come stage by stage, block by block, group by group: the cells' row order
        if not out or (out[-1]["resolution"], out[-1]["block"]) != (m.resolution, m.block):
            out.append({"resolution": m.resolution, "block": m.block, "query": list(m.query),
                        "image": png_data_url(cells[len(out) * cols]), "groups": []})
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


async def project_start(request: Request) -> JSONResponse:
    ex = request.app.state.explorer
    try:
        steps = int(request.query_params.get("steps", "200"))
    except ValueError:
        raise ConfigError("steps must be an integer") from None
    data = await _read_body(request, ex.limits.max_upload_bytes, "upload")
    target = await run_in_threadpool(decode_upload, data, ex.limits)
    return JSONResponse(_job_state(ex.start_projection(target, steps)))


def _job_state(job: ProjectionJob) -> dict:
    """What the page shows of a job: progress, and the images and latent once done."""
    state = {"job": job.id, "state": job.state, "step": job.step, "steps": job.steps, "loss": job.loss,
             "error": job.error}
    if job.result is not None:
        r = job.result
        state.update(image=png_data_url(r.image), target=png_data_url(r.target), psnr=r.psnr, distance=r.distance,
                     latent=encode_latent(r.ws))
    return state


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
        allowed_hosts: Host header values accepted (DNS-rebinding guard); "*" accepts any.
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
    middleware = [Middleware(SecurityHeaders), Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))]
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)
    app.state.explorer = explorer
    return app


# ---- running ------------------------------------------------------------------------------------


def loopback_hosts(host: str) -> list[str]:
    """Host headers to accept for a server bound to ``host``: the loopback names and ``host``
    itself, or any ("*") when it listens on every interface (then the user chose to open it)."""
    if host in ("0.0.0.0", "::", ""):
        return ["*"]
    return sorted({*LOOPBACK_NAMES, host})


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
    sock, url, server = _uvicorn(Explorer(g, limits), host, port)
    print(f"stylenat serve: {url}/ ({g.resolution}x{g.resolution}, {g.w_avg.device}; Ctrl-C stops)", flush=True)
    if not _is_loopback(host):
        print(f"stylenat serve: warning: listening on {host}: anyone who can reach this machine can use the app "
              "(there is no login)", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
