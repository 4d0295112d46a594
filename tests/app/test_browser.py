"""The explorer page in a real headless browser: Playwright driving the system's Chromium.

Needs the python package playwright (in the dev extra: pip install -e ".[dev]") and Chromium from
the system's packages (apt-get update && apt-get install chromium); skipped when either is missing.
Playwright's own browser download is not used: it launches /usr/bin/chromium (or $STYLENAT_CHROMIUM).
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

pytest.importorskip("starlette", reason='the app extra is not installed: pip install "stylenat[app]"')
pytest.importorskip("uvicorn", reason='the app extra is not installed: pip install "stylenat[app]"')
sync_api = pytest.importorskip("playwright.sync_api", reason='playwright is not installed: pip install "stylenat[browser-tests]"')
CHROMIUM = os.environ.get("STYLENAT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("no Chromium: apt-get install chromium (or set STYLENAT_CHROMIUM)", allow_module_level=True)

from stylenat.app import Explorer  # noqa: E402
from stylenat.app.server import BackgroundServer  # noqa: E402
from stylenat.sampling import generate  # noqa: E402
from tests.app.test_server import pixels, png_bytes  # noqa: E402

# No sandbox (root in a container), and no background traffic: the machine may have no network.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000
sync_api.expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture(scope="module")
def server(g):
    with BackgroundServer(Explorer(g)) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def cond_server(cond_g):
    with BackgroundServer(Explorer(cond_g)) as running:
        yield running


def open_page(browser, server):
    """The explorer, loaded, with its first image shown; fails the test if the page asked any other host."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    page.goto(server.url)
    page.wait_for_selector("#image[data-seed='0']")
    yield page
    page.close()
    elsewhere = [u for u in requested if not u.startswith((server.url, "data:"))]
    assert not elsewhere, f"the page asked other hosts: {elsewhere}"


@pytest.fixture
def page(browser, server):
    yield from open_page(browser, server)


@pytest.fixture
def cond_page(browser, cond_server):
    """The explorer of the class-conditional model (classes "cat" and "dog")."""
    yield from open_page(browser, cond_server)


def png_upload(image: torch.Tensor, name: str = "face.png") -> dict:
    return {"name": name, "mimeType": "image/png", "buffer": png_bytes(image)}


def test_changing_the_seed_changes_the_image(page):
    before = page.get_attribute("#image", "src")
    page.click("#seed-next")
    page.wait_for_selector("#image[data-seed='1']")
    assert page.get_attribute("#image", "src") != before
    page.fill("#seed", "42")
    page.wait_for_selector("#image[data-seed='42']")
    assert "error" not in (page.get_attribute("#status", "class") or "")


def test_the_seed_grid_shows_seeds_from_this_one_and_opens_a_clicked_one(page, g):
    page.fill("#seed", "10")
    page.wait_for_selector("#image[data-seed='10']")
    page.fill("#grid-rows", "2")
    page.fill("#grid-cols", "3")
    page.click("#grid-show")
    cells = page.locator("#grid button")
    sync_api.expect(cells).to_have_count(6)
    assert [cells.nth(i).get_attribute("title") for i in range(6)] == [f"seed {s}" for s in range(10, 16)]
    shown = torch.stack([pixels(cells.nth(i).locator("img").get_attribute("src")) for i in range(6)])
    assert torch.equal(shown, generate(g, range(10, 16), truncation_psi=0.7))  # the page's default ψ
    # Three columns: the second row starts under the first cell.
    first, fourth = cells.nth(0).bounding_box(), cells.nth(3).bounding_box()
    assert fourth["x"] == first["x"] and fourth["y"] > first["y"]
    cells.nth(4).click()
    page.wait_for_selector("#image[data-seed='14']")
    assert page.input_value("#seed") == "14"
    assert torch.equal(pixels(page.get_attribute("#image", "src")), shown[4])


def test_the_class_choice_changes_the_image(cond_page, cond_g):
    page = cond_page
    assert page.is_visible("#class-label")
    assert page.locator("#class option").all_inner_texts() == ["cat", "dog"]
    cat = page.get_attribute("#image", "src")
    assert torch.equal(pixels(cat), generate(cond_g, [0], truncation_psi=0.7, labels="cat")[0])
    page.select_option("#class", label="dog")
    sync_api.expect(page.locator("#image")).not_to_have_attribute("src", cat)
    dog = pixels(page.get_attribute("#image", "src"))
    assert torch.equal(dog, generate(cond_g, [0], truncation_psi=0.7, labels="dog")[0])


def test_unconditional_models_have_no_class_choice(page):
    assert not page.is_visible("#class-label")


def test_the_page_works_on_the_ipv6_loopback(browser, g):
    """Served on [::1], the page's own requests pass the Host and Origin checks (both carry brackets)."""
    import socket

    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("this machine has no IPv6 loopback (::1)")
    with BackgroundServer(Explorer(g), host="::1") as running:
        assert running.url.startswith("http://[::1]:")
        for page in open_page(browser, running):  # the first image came from a POST by the page
            page.click("#seed-next")
            page.wait_for_selector("#image[data-seed='1']")
            assert "error" not in (page.get_attribute("#status", "class") or "")


def test_clicking_a_pixel_shows_each_head_groups_attention(page):
    page.click("#image", position={"x": 200, "y": 40})
    page.wait_for_selector(".attn-row")
    rows = page.locator(".attn-row")
    assert rows.count() == 8  # 4 stages x 2 blocks
    # The 32x32 stage: the click at (40, 200) of a 256-pixel image is pixel (5, 25).
    assert "32×32 block 0: query (5, 25)" in rows.nth(6).inner_text()
    captions = rows.nth(6).locator("figcaption").all_inner_texts()
    assert [" ".join(c.split()) for c in captions] == [
        "query pixel", "group 0, 1 head kernel 3 dilation 1", "group 1, 1 head kernel 3 dilation 4"]
    page.uncheck("#stages input[value='4']")
    page.uncheck("#stages input[value='8']")
    page.click("#image", position={"x": 10, "y": 10})
    sync_api.expect(rows).to_have_count(4)


def test_mixing_produces_three_images(page):
    page.click("#tabs button[data-tab='mix']")
    page.click("#mix-groups button:text('fine')")
    assert page.locator("#mix-layers input:checked").count() == 2
    page.click("#mix-run")
    for image in ("#mix-a-image", "#mix-b-image", "#mix-image"):
        page.wait_for_selector(f"{image}[src^='data:image/png']")
    assert page.get_attribute("#mix-image", "src") != page.get_attribute("#mix-a-image", "src")


def test_interpolation_is_played_in_the_page(page):
    page.click("#tabs button[data-tab='interp']")
    page.fill("#interp-frames", "6")
    page.click("#interp-run")
    page.wait_for_selector("#interp-frame[src^='data:image/png']")
    assert page.get_attribute("#interp-pos", "max") == "5"
    first = page.inner_text("#interp-label")
    sync_api.expect(page.locator("#interp-label")).not_to_have_text(first)  # it plays
    page.click("#interp-play")  # pause
    assert page.inner_text("#interp-play") == "Play"


def test_editing_sliders_change_the_image(page):
    page.click("#tabs button[data-tab='edit']")
    page.wait_for_selector("#edit-image[src^='data:image/png']")
    before = page.get_attribute("#edit-image", "src")
    page.fill("#edit-sliders input >> nth=0", "6")
    sync_api.expect(page.locator("#edit-image")).not_to_have_attribute("src", before)


@pytest.mark.parametrize("upload, message", [
    ({"name": "big.png", "mimeType": "image/png", "buffer": b"\0" * (10 * 2**20 + 1)},
     "the upload is too large (10.0 MB; the limit is 10 MB)"),
    ({"name": "notes.png", "mimeType": "image/png", "buffer": b"just some text"},
     "the upload is not a PNG, JPEG or WebP image; only those types are accepted"),
    ({"name": "face.bmp", "mimeType": "image/bmp", "buffer": b"BM" + bytes(60)},
     "the upload is not a PNG, JPEG or WebP image; only those types are accepted"),
])
def test_bad_uploads_get_a_clear_message(page, upload, message):
    page.click("#tabs button[data-tab='project']")
    page.set_input_files("#project-file", upload)
    page.click("#project-start")
    page.wait_for_selector("#status.error")
    assert message in page.inner_text("#status")


def test_projection_shows_progress_and_offers_its_latent(page, g):
    page.click("#tabs button[data-tab='project']")
    page.fill("#project-steps", "15")
    page.set_input_files("#project-file", png_upload(generate(g, [9])[0]))
    page.click("#project-start")
    page.wait_for_selector("#project-caption:has-text('PSNR')")
    assert "done: step 15 of 15" in page.inner_text("#project-text")
    page.click("#tabs button[data-tab='edit']")
    page.wait_for_selector("#edit-image[src^='data:image/png']")
    before = page.get_attribute("#edit-image", "src")
    page.select_option("#edit-latent select", "projected")
    sync_api.expect(page.locator("#edit-image")).not_to_have_attribute("src", before)


def test_projection_progress_is_shown_part_way(page, g):
    """The bar and the text move while the projection runs, not only at its end; Stop ends it."""
    page.click("#tabs button[data-tab='project']")
    page.fill("#project-steps", "1000")
    page.set_input_files("#project-file", png_upload(generate(g, [4])[0]))
    page.click("#project-start")
    page.wait_for_function("() => { const v = document.getElementById('project-progress').value;"
                           " return v > 0 && v < 1; }")
    text = page.inner_text("#project-text")
    assert text.startswith("running: step ") and " of 1000, loss " in text
    step = int(text.split()[2])
    assert 0 < step < 1000
    page.click("#project-stop")
    page.wait_for_selector("#status.error")
    assert page.inner_text("#status") == "projection stopped"
    assert 0 < page.eval_on_selector("#project-progress", "p => p.value") < 1


def test_projection_on_a_conditional_model_uses_the_chosen_class(cond_page, cond_g):
    from stylenat.app.explorer import Limits, decode_upload
    from stylenat.projection import project

    page = cond_page
    upload = png_upload(generate(cond_g, [9], labels="dog")[0])
    page.select_option("#class", label="dog")
    page.click("#tabs button[data-tab='project']")
    page.fill("#project-steps", "8")
    page.set_input_files("#project-file", upload)
    page.click("#project-start")
    page.wait_for_selector("#project-caption:has-text('PSNR')")
    assert "done: step 8 of 8" in page.inner_text("#project-text")
    assert "error" not in (page.get_attribute("#status", "class") or "")
    target = decode_upload(upload["buffer"], Limits())
    as_dog, as_cat = (project(cond_g, target, label=label, steps=8) for label in ("dog", "cat"))
    assert not torch.equal(as_dog.image, as_cat.image)
    assert torch.equal(pixels(page.get_attribute("#project-image", "src")), as_dog.image)


@pytest.fixture(scope="module")
def rect_server(rect_g):
    with BackgroundServer(Explorer(rect_g)) as running:
        yield running


def test_a_rectangular_model_is_shown_at_its_aspect_and_clicked_per_axis(browser, rect_server, rect_g):
    """32 wide, 16 high: the image shows twice as wide as high, and a click maps x over the width
    and y over the height on their own."""
    for page in open_page(browser, rect_server):
        assert page.inner_text("#model-info").startswith("32×16, 8 latents, stages 4×2/8×4/16×8/32×16")
        assert torch.equal(pixels(page.get_attribute("#image", "src")), generate(rect_g, [0], truncation_psi=0.7)[0])
        box = page.locator("#image").bounding_box()
        assert (box["width"], box["height"]) == (256, 128)
        # (x 200, y 40) of a 256x128 picture is pixel (40 * 16 // 128, 200 * 32 // 256) = (5, 25).
        page.uncheck("#stages input[value='4']")
        page.uncheck("#stages input[value='8']")
        page.click("#image", position={"x": 200, "y": 40})
        rows = page.locator(".attn-row")
        sync_api.expect(rows).to_have_count(4)
        assert "16×8 block 0: query (2, 12)" in rows.nth(0).inner_text()
        assert "32×16 block 0: query (5, 25)" in rows.nth(2).inner_text()
        cell = rows.nth(2).locator("img").nth(1).bounding_box()
        assert cell["width"] == 2 * cell["height"]
        page.fill("#grid-rows", "1")
        page.fill("#grid-cols", "2")
        page.click("#grid-show")
        sync_api.expect(page.locator("#grid img")).to_have_count(2)
        grid_img = page.locator("#grid img").nth(0).bounding_box()
        assert grid_img["width"] == 2 * grid_img["height"]
