"""The demo app (`app.py`) as a user meets it: a real server in its own process, driven by a real headless Chromium."""

import io
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

from pipeline import ClassConditionedDDIMPipeline, ClassConditionedUNet
from pipeline.grid import labelled_grid
from tests.conftest import REPO_ROOT, TINY_UNET_CONFIG, cli_env, exit_code_and_stderr

pytest.importorskip("gradio", reason="the demo needs gradio: pip install -e '.[demo]'")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the browser test needs playwright: pip install playwright"
)

from pipeline import demo as app  # noqa: E402 (needs gradio, checked just above)
from pipeline import loading  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on this machine (Debian: apt-get install chromium); browser test skipped"
)
# Headless as root in a container, and quiet on a closed network (no update checks, sync or QUIC probes).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 30_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    """`python app.py --model DIR --port P` on a tiny saved pipeline; yields the page's URL."""
    model_dir = tmp_path_factory.mktemp("demo") / "tiny"
    torch.manual_seed(0)
    unet = ClassConditionedUNet(**TINY_UNET_CONFIG, id2label={i: str(i) for i in range(10)}).eval()
    ClassConditionedDDIMPipeline(unet=unet, scheduler=DDIMScheduler()).save_pretrained(model_dir)

    port = free_port()
    log = model_dir.parent / "server.log"
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "app.py", "--model", str(model_dir), "--port", str(port)],
            cwd=REPO_ROOT,
            env=cli_env(GRADIO_ANALYTICS_ENABLED="False", OMP_NUM_THREADS="1"),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"app.py exited {process.returncode}:\n{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"app.py did not answer on {url} within 60 s:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield url
        assert process.poll() is None, f"the server died:\n{log.read_text()[-4000:]}"
        assert "Traceback" not in log.read_text(), f"the server logged a traceback:\n{log.read_text()[-4000:]}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture
def page(server: str) -> Iterator:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(server)
        yield page
        browser.close()


def generate(page, digits: str, per_digit: int | None = None, steps: int | None = None) -> None:
    page.locator("#digits input").fill(digits)
    if per_digit is not None:
        page.locator("#per-digit input[type=number]").fill(str(per_digit))
        page.locator("#per-digit input[type=number]").press("Enter")
    if steps is not None:
        page.locator("#steps input").fill(str(steps))
    page.locator("#generate").click()


def fetch_png(page, url: str) -> Image.Image:
    body = page.request.get(url).body()
    assert body.startswith(b"\x89PNG\r\n\x1a\n"), f"{url} is not a PNG: {body[:16]!r}"
    return Image.open(io.BytesIO(body))


def expected_size(rows: list[str], columns: int) -> tuple[int, int]:
    # make_grid pads each 28-pixel cell by 2 (plus 2 at the far edge), times the display scale; labels on the left.
    width, height = labelled_grid(torch.zeros(len(rows) * columns, 1, 28, 28), rows, columns, scale=app.SCALE).size
    assert height == (len(rows) * 30 + 2) * app.SCALE
    return width, height


@needs_browser
def test_generate_in_the_browser_shows_and_offers_the_grid(page, tmp_path):
    generate(page, "2026", per_digit=3, steps=4)

    link = page.locator("#download a").first  # appears with the final grid only
    link.wait_for()
    with page.expect_download() as download_info:
        link.click()
    download = tmp_path / "grid.png"
    download_info.value.save_as(download)
    assert download.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert Image.open(download).size == expected_size(["2", "0", "2", "6"], columns=3)

    shown = fetch_png(page, page.locator("#grid img").first.get_attribute("src"))
    assert shown.size == expected_size(["2", "0", "2", "6"], columns=3)
    assert "4 x 3 samples, 4 ddim steps, guidance 1, seed 0" in page.locator("#grid").inner_text()


@needs_browser
def test_bad_input_shows_a_message_and_the_server_keeps_serving(page):
    for digits, steps, message in [
        ("", 4, "Enter at least one digit"),
        ("2a6", 4, "Not a digit this model knows: 'a'"),
        ("7", 100000, "Sampling steps must be a whole number from 1 to 200, got 100000"),
    ]:
        generate(page, digits, steps=steps)
        sync_api.expect(page.get_by_text(message)).to_be_visible()
    assert "Traceback" not in page.content()

    generate(page, "7", per_digit=2, steps=2)
    page.locator("#download a").first.wait_for()
    shown = fetch_png(page, page.locator("#grid img").first.get_attribute("src"))
    assert shown.size == expected_size(["7"], columns=2)


def test_digits_are_parsed_into_rows_with_readable_errors():
    labels = {str(digit): digit for digit in range(10)}
    assert app.parse_digits("2026", labels) == ["2", "0", "2", "6"]
    assert app.parse_digits(" 2, 0 2 ", labels) == ["2", "0", "2"]
    for text, message in [("", "Enter at least one digit"), ("12x", "'x'"), ("1" * 21, "At most 20 digits")]:
        with pytest.raises(app.gr.Error, match=message):
            app.parse_digits(text, labels)
    names = {"T-shirt/top": 0, "Bag": 8}  # longer label names (e.g. Fashion-MNIST) are separated by commas
    assert app.parse_digits("Bag, T-shirt/top", names) == ["Bag", "T-shirt/top"]


def test_model_comes_from_the_flag_or_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("MODEL", "you/mnist-diffusion")
    assert app.parse_args([]).model == "you/mnist-diffusion"
    assert app.parse_args(["--model", "output/run"]).model == "output/run"
    monkeypatch.delenv("MODEL")
    assert app.parse_args([]).model == loading.SHIPPED_MODEL  # a fresh clone draws before training anything
    monkeypatch.setattr(loading, "SHIPPED_MODEL", "/nonexistent/models/mnist")  # installed without the repository
    with pytest.raises(SystemExit):
        app.parse_args([])
    assert "set the MODEL environment variable" in capsys.readouterr().err


def test_a_bad_model_folder_stops_with_one_line(tmp_path, capsys):
    # In this process (the served app above is the real one): app.py only calls `cli`.
    code, stderr = exit_code_and_stderr(app.cli, ["--model", str(tmp_path)], capsys)
    assert code == 2 and stderr.startswith("error: ") and "not a saved pipeline" in stderr
