"""The explorer page in a real headless browser: Playwright driving the system's Chromium.

Needs the python package playwright (pip install -e ".[dev,browser-tests]") and Chromium from
the system's packages (apt-get install chromium); skipped when either is missing. Playwright's own
browser download is not used: it launches /usr/bin/chromium (or $STYLENAT_CHROMIUM).
"""

from __future__ import annotations

import os
import shutil

import pytest

pytest.importorskip("starlette", reason='the app extra is not installed: pip install "stylenat[app]"')
pytest.importorskip("uvicorn", reason='the app extra is not installed: pip install "stylenat[app]"')
sync_api = pytest.importorskip("playwright.sync_api", reason='playwright is not installed: pip install "stylenat[browser-tests]"')
CHROMIUM = os.environ.get("STYLENAT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("no Chromium: apt-get install chromium (or set STYLENAT_CHROMIUM)", allow_module_level=True)

from stylenat.app import Explorer  # noqa: E402
from stylenat.app.server import BackgroundServer  # noqa: E402

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


@pytest.fixture
def page(browser, server):
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


def test_changing_the_seed_changes_the_image(page):
    before = page.get_attribute("#image", "src")
    page.click("#seed-next")
    page.wait_for_selector("#image[data-seed='1']")
    assert page.get_attribute("#image", "src") != before
    page.fill("#seed", "42")
    page.wait_for_selector("#image[data-seed='42']")
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
     "the upload is not an image Pillow can read"),
])
def test_bad_uploads_get_a_clear_message(page, upload, message):
    page.click("#tabs button[data-tab='project']")
    page.set_input_files("#project-file", upload)
    page.click("#project-start")
    page.wait_for_selector("#status.error")
    assert message in page.inner_text("#status")


def test_projection_shows_progress_and_offers_its_latent(page, g):
    import io

    from PIL import Image

    from stylenat.sampling import generate

    buffer = io.BytesIO()
    Image.fromarray(generate(g, [9])[0].permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    page.click("#tabs button[data-tab='project']")
    page.fill("#project-steps", "15")
    page.set_input_files("#project-file", {"name": "face.png", "mimeType": "image/png", "buffer": buffer.getvalue()})
    page.click("#project-start")
    page.wait_for_selector("#project-caption:has-text('PSNR')")
    assert "done: step 15 of 15" in page.inner_text("#project-text")
    page.click("#tabs button[data-tab='edit']")
    page.wait_for_selector("#edit-image[src^='data:image/png']")
    before = page.get_attribute("#edit-image", "src")
    page.select_option("#edit-latent select", "projected")
    sync_api.expect(page.locator("#edit-image")).not_to_have_attribute("src", before)
