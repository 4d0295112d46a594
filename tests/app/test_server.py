"""The explorer's HTTP API on a real server (uvicorn in a thread, plain urllib): every endpoint
against the library functions it calls, the limits, the lock and the one-line CLI errors."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib
from importlib.resources import files
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("starlette", reason='the app extra is not installed: pip install "stylenat[app]"')
pytest.importorskip("uvicorn", reason='the app extra is not installed: pip install "stylenat[app]"')

from stylenat.app import Explorer, Limits  # noqa: E402
from stylenat.app.explorer import (  # noqa: E402
    Busy, FairLock, ProjectionJob, class_names, decode_upload, layer_groups)
from stylenat.app.server import BackgroundServer, encode_latent  # noqa: E402
from stylenat.cli import main  # noqa: E402
from stylenat.editing import edit, render, sefa_directions  # noqa: E402
from stylenat.errors import DataError  # noqa: E402
from stylenat.projection import ProjectionResult, project  # noqa: E402
from stylenat.sampling import as_ws, generate, interpolate, style_mix  # noqa: E402

SIZE = 32  # the tiny preset
NOT_ACCEPTED = "the upload is not a PNG, JPEG or WebP image; only those types are accepted"


@pytest.fixture(scope="module")
def server(g):
    with BackgroundServer(Explorer(g)) as running:
        yield running


@pytest.fixture(scope="module")
def cond_server(cond_g):
    """The explorer of a class-conditional model (classes "cat" and "dog")."""
    with BackgroundServer(Explorer(cond_g)) as running:
        yield running


def call(server, path: str, body=None, headers: dict | None = None, method: str | None = None) -> tuple[int, dict]:
    """(status, JSON answer) of a request; a dict body is sent as JSON, bytes as they are."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    hdrs = {"content-type": "application/json"} if isinstance(body, dict) else {}
    req = urllib.request.Request(server.url + path, data=data, headers={**hdrs, **(headers or {})}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=120) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def pixels(data_url: str) -> torch.Tensor:
    """A PNG data URL -> uint8 [3, H, W]."""
    assert data_url.startswith("data:image/png;base64,")
    png = base64.b64decode(data_url.split(",", 1)[1])
    return torch.from_numpy(np.array(Image.open(io.BytesIO(png)).convert("RGB"))).permute(2, 0, 1)


def png_bytes(image: torch.Tensor, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format=fmt)
    return buffer.getvalue()


def huge_png_header(width: int, height: int) -> bytes:
    """A 70-byte PNG whose header says width x height (1-bit grey); its pixel data is not all there."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))


def has_ipv6_loopback() -> bool:
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
        return True
    except OSError:
        return False


def ws_field(g, seed: int) -> dict:
    return {"ws": encode_latent(as_ws(g, [seed])[0])}


def latent_of(text: str, g) -> torch.Tensor:
    """A latent as the API sends it (base64 float32) -> ws [num_ws, style_dim]."""
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype="<f4").copy()).view(g.num_ws, g.style_dim)


# ---- the page --------------------------------------------------------------------------------------


def test_page_and_its_files_are_served_with_the_security_headers(server):
    with urllib.request.urlopen(server.url + "/") as res:
        html = res.read().decode()
        assert "default-src 'self'" in res.headers["content-security-policy"]
        assert res.headers["x-content-type-options"] == "nosniff"
    assert '<script src="/static/app.js"' in html and '<link rel="stylesheet" href="/static/style.css">' in html
    for name in ("app.js", "style.css"):
        with urllib.request.urlopen(f"{server.url}/static/{name}") as res:
            assert res.status == 200 and res.read()


def test_page_loads_nothing_from_elsewhere():
    """Offline: no file of the page names another host (no CDN script, font or style)."""
    static = files("stylenat.app") / "static"
    names = sorted(p.name for p in static.iterdir())
    assert names == ["app.js", "index.html", "style.css"]
    for name in names:
        text = (static / name).read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), name
        assert "@import" not in text and "url(" not in text, name


def test_static_files_name_no_other_path(server):
    for path in ("/static/../explorer.py", "/static/%2e%2e/explorer.py", "/static/../../errors.py"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(server.url + path)
        assert err.value.code == 404


def test_foreign_host_header_is_refused(server):
    """DNS rebinding: a page on another site that resolves its name to 127.0.0.1 gets nothing."""
    req = urllib.request.Request(server.url + "/api/info", headers={"Host": "evil.example"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req)
    assert err.value.code == 400


@pytest.mark.parametrize("host, status", [
    ("[::1]:{port}", 200), ("[::1]", 200), ("[0:0:0:0:0:0:0:1]:{port}", 200), ("LOCALHOST:{port}", 200),
    ("127.0.0.1", 200), ("evil.example:{port}", 400), ("[::2]:{port}", 400), ("127.0.0.1:99999", 400),
    ("127.0.0.1@evil.example", 400), ("[::1", 400), ("", 400),
])
def test_host_header_names_are_compared_without_port_and_brackets(server, host, status):
    """A loopback server answers to its names with any port, IPv6 in brackets included (Starlette's
    TrustedHostMiddleware split "[::1]:port" at the first ':' and refused it)."""
    port = server.url.rsplit(":", 1)[1]
    code, answer = call(server, "/api/info", headers={"Host": host.format(port=port)})
    assert code == status
    if status == 400:
        assert "does not answer to the Host" in answer["error"]


@pytest.mark.parametrize("bind", ["::1", "[::1]"])
@pytest.mark.skipif(not has_ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_serving_on_the_ipv6_loopback(g, bind):
    with BackgroundServer(Explorer(g), host=bind) as running:
        assert re.fullmatch(r"http://\[::1\]:\d+", running.url)
        status, info = call(running, "/api/info")  # urllib sends Host: [::1]:port
        assert status == 200 and info["resolution"] == SIZE
        # What the browser sends from the page: a POST with its own origin.
        status, answer = call(running, "/api/image", {"latent": {"seed": 3}}, {"Origin": running.url})
        assert status == 200 and torch.equal(pixels(answer["image"]), generate(g, [3])[0])


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://localhost:{port}",
                                    "https://127.0.0.1:{port}", "http://127.0.0.1:{other}", "http://127.0.0.1"])
def test_requests_from_other_origins_are_refused(server, origin):
    """A page on another site (or another port, scheme or host name) cannot use the model."""
    port = int(server.url.rsplit(":", 1)[1])
    origin = origin.format(port=port, other=port + 1)
    for path, body in [("/api/image", {"latent": {"seed": 1}}), ("/api/project?steps=5", b"\x89PNG"),
                       ("/api/info", None)]:
        status, answer = call(server, path, body, {"Origin": origin})
        assert status == 403, path
        assert answer["error"] == f"requests from pages of other origins are refused (Origin {origin!r})"


def test_requests_from_the_page_itself_or_without_origin_are_served(server):
    for headers in ({"Origin": server.url}, {"Origin": server.url.upper().replace("HTTP", "http")}, {}):
        status, _ = call(server, "/api/image", {"latent": {"seed": 1}}, headers)
        assert status == 200, headers


# ---- every endpoint against the library ------------------------------------------------------------


def test_info_names_stages_groups_and_limits(server, g):
    status, info = call(server, "/api/info")
    assert status == 200
    assert (info["resolution"], info["num_ws"], info["style_dim"]) == (SIZE, g.num_ws, g.style_dim)
    assert [s["resolution"] for s in info["stages"]] == [4, 8, 16, 32]
    assert info["stages"][3] == {"resolution": 32, "kernels": [[3, 3], [3, 3]], "dilations": [[1, 1], [4, 4]]}
    assert info["layer_groups"] == {"coarse": [0, 1, 2, 3], "middle": [4, 5], "fine": [6, 7]}
    assert info["classes"] == []  # unconditional: the page hides the class control
    assert info["limits"]["max_upload_bytes"] == 10 * 2**20


def test_image_is_the_seeds_image_and_changes_with_the_seed(server, g):
    status, answer = call(server, "/api/image", {"latent": {"seed": 3}, "psi": 0.7})
    assert status == 200
    assert torch.equal(pixels(answer["image"]), generate(g, [3], 0.7)[0])
    _, other = call(server, "/api/image", {"latent": {"seed": 4}, "psi": 0.7})
    assert not torch.equal(pixels(other["image"]), pixels(answer["image"]))


def test_latent_as_data_gives_the_same_image(server, g):
    _, by_seed = call(server, "/api/image", {"latent": {"seed": 3}})
    _, by_data = call(server, "/api/image", {"latent": ws_field(g, 3)})
    assert torch.equal(pixels(by_data["image"]), pixels(by_seed["image"]))


def test_grid(server, g):
    status, answer = call(server, "/api/grid", {"seed": 5, "count": 6, "psi": 0.5})
    assert status == 200 and answer["seeds"] == list(range(5, 11))
    assert torch.equal(torch.stack([pixels(x) for x in answer["images"]]), generate(g, range(5, 11), 0.5))


def test_mix_is_style_mix(server, g):
    status, answer = call(server, "/api/mix", {"a": {"seed": 1}, "b": ws_field(g, 2), "layers": [0, 1, 2, 3]})
    assert status == 200
    grid = style_mix(g, [1], [2], [0, 1, 2, 3])
    a, b, mixed = (pixels(x) for x in answer["images"])
    assert torch.equal(a, grid[1, 0]) and torch.equal(b, grid[0, 1]) and torch.equal(mixed, grid[1, 1])
    assert not torch.equal(mixed, a) and not torch.equal(mixed, b)


def test_interpolation_runs_from_a_to_b(server, g):
    status, answer = call(server, "/api/interpolate", {"a": {"seed": 1}, "b": {"seed": 2}, "frames": 5, "psi": 0.8})
    assert status == 200 and len(answer["frames"]) == 5
    frames = torch.stack([pixels(x) for x in answer["frames"]])
    assert torch.equal(frames, interpolate(g, [1, 2], 4, loop=False, truncation_psi=0.8))
    assert torch.equal(frames[0], generate(g, [1], 0.8)[0]) and torch.equal(frames[-1], generate(g, [2], 0.8)[0])


def test_attention_names_each_head_group(server, g):
    status, answer = call(server, "/api/attention", {"seed": 0, "pixel": [10, 20], "resolutions": [16, 32]})
    assert status == 200 and answer["pixel"] == [10, 20]
    rows = answer["rows"]
    assert [(r["resolution"], r["block"]) for r in rows] == [(16, 0), (16, 1), (32, 0), (32, 1)]
    assert rows[0]["query"] == [10 * 16 // SIZE, 20 * 16 // SIZE] and rows[2]["query"] == [10, 20]
    assert [(gr["kernel"], gr["dilation"], gr["heads"]) for gr in rows[2]["groups"]] == [([3, 3], [1, 1], 1),
                                                                                       ([3, 3], [4, 4], 1)]
    assert pixels(rows[2]["groups"][1]["image"]).shape == (3, 128, 128)
    _, everything = call(server, "/api/attention", {"seed": 0, "pixel": [0, 0]})
    assert len(everything["rows"]) == 2 * len(g.synthesis.stages)


def test_edit_adds_the_weighted_directions(server, g):
    _, plain = call(server, "/api/image", {"latent": {"seed": 7}})
    _, zero = call(server, "/api/edit", {"latent": {"seed": 7}, "strengths": [0, 0, 0]})
    assert torch.equal(pixels(zero["image"]), pixels(plain["image"]))
    status, moved = call(server, "/api/edit", {"latent": {"seed": 7}, "strengths": [4, -2], "group": "coarse"})
    assert status == 200
    directions = sefa_directions(g, [0, 1, 2, 3])[0]
    expected = render(g, edit(g, as_ws(g, [7])[0], 4 * directions[0] - 2 * directions[1], [1.0], [0, 1, 2, 3]))[0]
    assert torch.equal(pixels(moved["image"]), expected)


# ---- bad values and limits -------------------------------------------------------------------------


@pytest.mark.parametrize("path, body, message", [
    ("/api/image", {"latent": {"seed": -1}}, "seed must be an integer in 0-4294967295"),
    ("/api/image", {"latent": {"seed": "3"}}, "seed must be an integer"),
    ("/api/image", {"latent": "/etc/passwd"}, 'must be {"seed": N}'),
    ("/api/image", {"latent": {"ws": "AAAA"}}, "must be 8x64 float32 values"),
    ("/api/image", {"latent": {"ws": "not base64!"}}, "base64"),
    ("/api/image", {"latent": {"seed": 1}, "psi": 9}, "psi must be a number in [-1, 2]"),
    ("/api/image", {"latent": {"seed": 1}, "class": 0}, "not class-conditional"),
    ("/api/grid", {"seed": 0, "count": 65}, "a grid holds 1-64 images"),
    ("/api/mix", {"a": {"seed": 1}, "b": {"seed": 2}, "layers": [8]}, "layers must be ws indices in 0-7"),
    ("/api/interpolate", {"a": {"seed": 1}, "b": {"seed": 2}, "frames": 61}, "2-60 frames"),
    ("/api/attention", {"seed": 0, "pixel": [1]}, "pixel must be [y, x]"),
    ("/api/attention", {"seed": 0, "pixel": [40, 0]}, "outside the 32x32 image"),
    ("/api/attention", {"seed": 0, "pixel": [0, 0], "resolutions": [64]}, "no stage at resolution"),
    ("/api/edit", {"latent": {"seed": 1}, "strengths": [1] * 9}, "give 1-8 finite strengths"),
    ("/api/edit", {"latent": {"seed": 1}, "strengths": [1], "group": "nope"}, "layer group must be one of"),
    ("/api/project/0123456789abcdef", None, "no such projection job"),
])
def test_bad_values_answer_400_with_a_message(server, path, body, message):
    status, answer = call(server, path, body)
    assert status == 400 and message in answer["error"]


def test_non_json_and_oversized_bodies(server):
    status, answer = call(server, "/api/image", b"not json", {"content-type": "application/json"})
    assert status == 400 and "JSON object" in answer["error"]
    status, answer = call(server, "/api/image", b"[1, 2]")
    assert status == 400 and "JSON object" in answer["error"]
    status, answer = call(server, "/api/image", b" " * (2**20 + 1))
    assert status == 413 and "the request is too large (1.0 MB; the limit is 1 MB)" == answer["error"]


def test_uploads_are_limited_in_size_and_type(server, g):
    status, answer = call(server, "/api/project?steps=5", b"\0" * (10 * 2**20 + 1))
    assert status == 413 and answer["error"] == "the upload is too large (10.0 MB; the limit is 10 MB)"
    status, answer = call(server, "/api/project?steps=5", b"%PDF-1.4 certainly not an image")
    assert status == 415 and answer["error"] == NOT_ACCEPTED
    status, answer = call(server, "/api/project?steps=5000", png_bytes(generate(g, [1])[0]))
    assert status == 400 and "1-1000 steps" in answer["error"]


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "GIF", "PPM", "ICO"])
def test_only_png_jpeg_and_webp_uploads_are_decoded(server, g, fmt):
    """Images Pillow could read in other formats are refused before any of their readers runs."""
    data = png_bytes(generate(g, [1])[0], fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow itself would open it
    status, answer = call(server, "/api/project?steps=5", data)
    assert status == 415 and answer["error"] == NOT_ACCEPTED


def test_eps_uploads_never_reach_ghostscript(monkeypatch):
    from PIL import EpsImagePlugin

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: pytest.fail("Ghostscript was called"))
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    with pytest.raises(DataError, match="not a PNG, JPEG or WebP image"):
        decode_upload(eps, Limits())


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_png_jpeg_and_webp_uploads_are_decoded(g, fmt):
    image = generate(g, [1])[0]
    decoded = torch.from_numpy(np.array(decode_upload(png_bytes(image, fmt), Limits()))).permute(2, 0, 1)
    assert decoded.shape == (3, SIZE, SIZE)
    if fmt == "PNG":
        assert torch.equal(decoded, image)
    else:  # lossy: close, not equal
        assert (decoded.float() - image.float()).abs().mean() < 30


def test_damaged_uploads_get_a_clear_message(g):
    data = png_bytes(generate(g, [1])[0])
    message = r"^the upload is a damaged PNG file .*\(OSError\); upload a PNG, JPEG or WebP file$"
    with pytest.raises(DataError, match=message):
        decode_upload(data[: len(data) // 2], Limits())


def test_decoded_size_is_limited_before_decoding(g):
    with pytest.raises(DataError, match="64x64 pixels; the limit is 1,000 pixels"):
        decode_upload(png_bytes(torch.zeros(3, 64, 64, dtype=torch.uint8)), Limits(max_upload_pixels=1000))
    assert decode_upload(png_bytes(generate(g, [1])[0]), Limits()).size == (SIZE, SIZE)


def test_images_past_pillows_bomb_threshold_get_the_pixel_limit_message(server):
    """20000x20000 in 70 bytes: beyond Pillow's own decompression-bomb error, which must not be what the user sees."""
    data = huge_png_header(20000, 20000)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))
    status, answer = call(server, "/api/project?steps=5", data)
    assert status == 415 and answer["error"] == "the image is 20000x20000 pixels; the limit is 40,000,000 pixels"


# ---- projection jobs ---------------------------------------------------------------------------------


def wait_for_job(server, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, state = call(server, f"/api/project/{job_id}")
        assert status == 200
        if state["state"] in ("done", "failed", "stopped") or time.monotonic() > deadline:
            return state
        time.sleep(0.05)


def test_projection_reports_progress_and_returns_a_usable_latent(server, g):
    status, job = call(server, "/api/project?steps=20", png_bytes(generate(g, [5])[0]))
    assert status == 200 and job["steps"] == 20 and job["state"] in ("queued", "running")
    state = wait_for_job(server, job["job"])
    assert state["state"] == "done" and state["step"] == 20 and state["loss"] > 0
    assert torch.equal(pixels(state["target"]), generate(g, [5])[0])
    assert state["psnr"] > 10
    _, again = call(server, "/api/image", {"latent": {"ws": state["latent"]}})
    assert torch.equal(pixels(again["image"]), pixels(state["image"]))


def test_projection_on_a_conditional_model_searches_the_chosen_class(cond_server, cond_g):
    """The page sends the class chosen in its header; the job projects into that class."""
    data = png_bytes(generate(cond_g, [5], labels="dog")[0])
    status, job = call(cond_server, "/api/project?steps=6&class=1", data)
    assert status == 200, job
    state = wait_for_job(cond_server, job["job"])
    assert state["state"] == "done" and state["step"] == 6, state
    target = decode_upload(data, Limits())
    as_dog, as_cat = (project(cond_g, target, label=label, steps=6) for label in ("dog", "cat"))
    assert not torch.allclose(as_dog.ws, as_cat.ws, atol=1e-3)  # the class matters, so this test can tell
    assert torch.allclose(latent_of(state["latent"], cond_g), as_dog.ws, atol=1e-5)
    assert torch.equal(pixels(state["image"]), as_dog.image)


@pytest.mark.parametrize("query, message", [
    ("steps=5", "this model is class-conditional: give the target's class (an index in 0-1)"),
    ("steps=5&class=2", "class must be an index in 0-1, got 2"),
    ("steps=5&class=dog", "class must be an integer, got 'dog'"),
])
def test_projection_on_a_conditional_model_needs_a_valid_class(cond_server, cond_g, query, message):
    status, answer = call(cond_server, f"/api/project?{query}", png_bytes(generate(cond_g, [5], labels=0)[0]))
    assert status == 400 and answer["error"] == message


def test_projection_on_an_unconditional_model_takes_no_class(server, g):
    status, answer = call(server, "/api/project?steps=5&class=0", png_bytes(generate(g, [5])[0]))
    assert status == 400 and "not class-conditional" in answer["error"]


def test_projection_status_with_numbers_json_cannot_hold(server, g):
    """A perfect reconstruction has PSNR inf and a loss can be NaN: the status is still valid JSON."""
    image = generate(g, [5])[0]
    result = ProjectionResult(latent=as_ws(g, [5])[0], space="w+", num_ws=g.num_ws, image=image, target=image,
                              losses={}, psnr=math.inf, distance="laplacian-pyramid")
    job = ProjectionJob(id="00ff00ff00ff00ff", steps=3, step=3, loss=math.nan, state="done", result=result)
    previous, server.explorer.job = server.explorer.job, job
    try:
        with urllib.request.urlopen(f"{server.url}/api/project/{job.id}") as res:
            text = res.read().decode()

        def refuse(token):
            raise AssertionError(f"not JSON: {token}")

        state = json.loads(text, parse_constant=refuse)
    finally:
        server.explorer.job = previous
    assert (state["psnr"], state["loss"], state["state"]) == ("inf", "nan", "done")
    assert torch.equal(pixels(state["image"]), image)


def test_projection_can_be_stopped_and_one_runs_at_a_time(server, g):
    target = png_bytes(generate(g, [6])[0])
    _, job = call(server, "/api/project?steps=1000", target)
    status, answer = call(server, "/api/project?steps=10", target)
    assert status == 503 and "a projection is running" in answer["error"]
    # Requests go first between projection steps: the page stays usable while it runs.
    start = time.monotonic()
    status, _ = call(server, "/api/image", {"latent": {"seed": 1}})
    assert status == 200 and time.monotonic() - start < 10
    status, _ = call(server, f"/api/project/{job['job']}/stop", b"")
    assert status == 200
    state = wait_for_job(server, job["job"])
    assert state["state"] == "stopped" and state["step"] < 1000


# ---- one request at a time -------------------------------------------------------------------------


def test_concurrent_requests_use_the_model_one_at_a_time(server, g):
    active, most = [0], [0]

    def enter(*_):
        active[0] += 1
        most[0] = max(most[0], active[0])
        time.sleep(0.01)  # widen the window in which an unlocked second request would overlap

    def leave(*_):
        active[0] -= 1

    hooks = [g.synthesis.register_forward_pre_hook(enter), g.synthesis.register_forward_hook(leave)]
    bodies = [("/api/image", {"latent": {"seed": 1}}), ("/api/attention", {"seed": 2, "pixel": [3, 4]}),
              ("/api/mix", {"a": {"seed": 1}, "b": {"seed": 2}, "layers": [0]}),
              ("/api/grid", {"seed": 0, "count": 3}), ("/api/edit", {"latent": {"seed": 1}, "strengths": [2]})] * 3
    results: list[int] = []
    threads = [threading.Thread(target=lambda p=p, b=b: results.append(call(server, p, b)[0])) for p, b in bodies]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        for hook in hooks:
            hook.remove()
    assert results == [200] * len(bodies)
    assert most[0] == 1


def test_a_request_that_cannot_get_the_model_is_told_it_is_busy(g):
    explorer = Explorer(g, Limits(wait_s=0.2))
    with BackgroundServer(explorer) as running:
        assert explorer.lock.acquire(1)
        try:
            status, answer = call(running, "/api/image", {"latent": {"seed": 1}})
        finally:
            explorer.lock.release()
        assert status == 503 and "busy" in answer["error"]
        assert call(running, "/api/image", {"latent": {"seed": 1}})[0] == 200


def test_fair_lock_serves_in_arrival_order():
    lock, order = FairLock(), []
    assert lock.acquire()

    def worker(i: int) -> None:
        assert lock.acquire(10)
        order.append(i)
        lock.release()

    threads = []
    for i in range(4):
        threads.append(threading.Thread(target=worker, args=(i,)))
        threads[-1].start()
        while len(lock._queue) < i + 1:  # let each one queue before the next starts
            time.sleep(0.001)
    assert not lock.acquire(0.05)  # a timed-out waiter leaves the queue
    lock.yield_turn()  # the holder lets all four go first, then has the lock again
    assert order == [0, 1, 2, 3]
    lock.release()
    for t in threads:
        t.join()
    with pytest.raises(Busy):
        with lock.hold(0):
            with lock.hold(0.05):
                pass


# ---- model facts ----------------------------------------------------------------------------------


def test_layer_groups_follow_stylegan_bands_or_thirds():
    assert layer_groups(SimpleNamespace(num_ws=14, resolution=256)) == {
        "coarse": [0, 1, 2, 3], "middle": [4, 5, 6, 7], "fine": [8, 9, 10, 11, 12, 13]}
    assert layer_groups(SimpleNamespace(num_ws=4, resolution=8)) == {"coarse": [0, 1], "middle": [2, 3]}


def test_a_conditional_model_draws_the_chosen_class(g, cond_g):
    assert class_names(g) == [] and Explorer(g).info()["classes"] == []
    cond = cond_g
    explorer = Explorer(cond)
    assert explorer.info()["classes"] == ["cat", "dog"]
    assert torch.equal(explorer.image(3, psi=0.5, cls=1), generate(cond, [3], truncation_psi=0.5, labels="dog")[0])
    assert torch.equal(explorer.grid(0, 2), generate(cond, [0, 1], labels=0))  # class 0 unless asked
    assert not torch.equal(explorer.image(3, cls=0), explorer.image(3, cls=1))
    with pytest.raises(ValueError, match="class must be an index in 0-1"):
        explorer.image(3, cls=2)
    with pytest.raises(ValueError, match="not class-conditional"):
        Explorer(g).image(3, cls=0)


# ---- the command -----------------------------------------------------------------------------------


def test_serve_without_the_extra_says_how_to_install_it(model_file, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "starlette" else real(name, *a))
    assert main(["serve", str(model_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == 'stylenat serve: error: the web app needs starlette: pip install "stylenat[app]"'


def test_serve_on_a_taken_port_is_a_one_line_error(model_file, server, capsys):
    port = server.url.rsplit(":", 1)[1]
    assert main(["serve", str(model_file), "--device", "cpu", "--port", port]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"stylenat serve: error: cannot listen on 127.0.0.1:{port}") and "\n" not in err


# ---- a rectangular model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rect_server(rect_g):
    with BackgroundServer(Explorer(rect_g)) as running:
        yield running


def test_a_rectangular_model_is_served_at_its_width_and_height(rect_server, rect_g):
    """32 wide, 16 high: the PNGs are 32x16 (not squares), the JSON names width and height, and a
    pixel is [y, x] with y over the 16 rows and x over the 32 columns."""
    status, info = call(rect_server, "/api/info")
    assert status == 200
    assert (info["resolution"], info["width"], info["height"]) == ([16, 32], 32, 16)
    assert [(s["width"], s["height"]) for s in info["stages"]] == [(4, 2), (8, 4), (16, 8), (32, 16)]
    assert info["stages"][1]["resolution"] == [4, 8] and info["stages"][1]["kernels"] == [[4, 7], [4, 7]]
    status, answer = call(rect_server, "/api/image", {"latent": {"seed": 3}, "psi": 0.7})
    assert status == 200
    png = base64.b64decode(answer["image"].split(",", 1)[1])
    assert Image.open(io.BytesIO(png)).size == (32, 16)  # PIL: (width, height)
    assert torch.equal(pixels(answer["image"]), generate(rect_g, [3], 0.7)[0])
    _, grid = call(rect_server, "/api/grid", {"seed": 5, "count": 3})
    assert torch.equal(torch.stack([pixels(x) for x in grid["images"]]), generate(rect_g, range(5, 8)))
    # Row 15, column 30 exists (a square of side 16 would refuse x = 30, one of side 32 would take y = 20).
    status, attn = call(rect_server, "/api/attention", {"seed": 0, "pixel": [15, 30], "resolutions": [32, "16x8"]})
    assert status == 200, attn
    rows = attn["rows"]
    assert [(r["width"], r["height"], r["block"]) for r in rows] == [(16, 8, 0), (16, 8, 1), (32, 16, 0), (32, 16, 1)]
    assert rows[0]["query"] == [15 * 8 // 16, 30 * 16 // 32] and rows[2]["query"] == [15, 30]
    cell = pixels(rows[2]["groups"][0]["image"])
    assert cell.shape[1] < cell.shape[2]  # the cells keep the image's aspect: wider than high
    status, answer = call(rect_server, "/api/attention", {"seed": 0, "pixel": [20, 3]})
    assert status == 400 and "outside the 32x16 image" in answer["error"]


def test_layer_groups_of_rectangles_follow_the_longer_side():
    # 32x16: 4 stages split in thirds, as a 32x32 model; 256x192 (7 stages): StyleGAN's bands by stage.
    assert layer_groups(SimpleNamespace(num_ws=8, resolution=(16, 32))) == layer_groups(
        SimpleNamespace(num_ws=8, resolution=32))
    assert layer_groups(SimpleNamespace(num_ws=14, resolution=(192, 256))) == layer_groups(
        SimpleNamespace(num_ws=14, resolution=256))
