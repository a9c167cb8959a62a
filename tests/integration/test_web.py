"""The web page of ``barkgpt serve`` in a real browser: Debian's Chromium, headless, driven by
Playwright for Python (``executable_path=/usr/bin/chromium``; ``make test`` installs it with
apt-get, and these tests skip, saying so, only where it is not installed).

One ``barkgpt serve`` process (API key ``KEY``) serves a random model with a 1024-token context,
whose greedy replies run long at about 4 ms a token, so a reply visibly streams and Stop has
something to stop. Its ``--runs`` folder holds ``bark-tiny``, a Bark run trained for 60 steps while
the server starts; the page itself starts a run that fails and one that it then stops.
Screenshots at 1280 and 375 px wide go to ``tests/artifacts/`` (git-ignored). The page's
Content-Security-Policy stays on (so these tests also show the page works under it); it forbids
``eval``, which Playwright's ``wait_for_function`` uses on a bare expression, so each wait is an
arrow function.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is missing: pip install -e '.[dev]'")
from test_server import BARKS, KEY, launch, send, stop, wait_ready

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
WIDE, PHONE = {"width": 1280, "height": 800}, {"width": 375, "height": 740}
SLOW = "slow"  # the served model's id
TIMEOUT_MS = 20_000  # Playwright's wait for any one thing


def train_tiny(out: Path) -> None:
    """Train ``out``: the Bark preset for 60 steps, a train-loss row every 5 and an eval every 30."""
    import torch

    from barkgpt.config import build_configs
    from barkgpt.train import train

    overrides = {
        "out_dir": str(out),
        "max_iters": 60,
        "warmup_iters": 10,
        "eval_interval": 30,
        "eval_iters": 2,
        "log_interval": 5,
        "seed": 0,
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(*build_configs("bark", None, overrides), quiet=True)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The server's runs folder (``server`` trains ``bark-tiny`` into it)."""
    return tmp_path_factory.mktemp("web") / "runs"


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory) -> Path:
    """A random 4-layer model (Bark tokenizer, 1024-token context) whose greedy reply to "speak"
    runs at least 300 tokens without <EOS>: the first init seed that does."""
    import torch

    from barkgpt.bark import bark_tokenizer
    from barkgpt.checkpoint import save_checkpoint
    from barkgpt.config import GPTConfig
    from barkgpt.generate import TextGenerator
    from barkgpt.model import GPT

    tok, out = bark_tokenizer(), tmp_path_factory.mktemp("slow") / SLOW
    prompt = tok.apply_chat_template([{"role": "user", "content": "speak"}], add_generation_prompt=True)
    for seed in (4, *range(8)):  # untied embeddings: a random model that does not just echo its last token
        torch.manual_seed(seed)
        model = GPT(
            GPTConfig(vocab_size=tok.vocab_size, block_size=1024, n_layer=4, n_head=4, n_embd=256, tie_embeddings=False)
        ).eval()
        if TextGenerator(model, tok).complete(prompt, max_new_tokens=300, temperature=0)[0].finish_reason == "length":
            save_checkpoint(out, model, tok)
            return out
    pytest.fail("no init seed gave a long greedy reply")


@pytest.fixture(scope="module")
def server(slow_model, runs):
    """Base URL of ``barkgpt serve --model slow --runs RUNS`` (API key ``KEY``), with ``bark-tiny``
    trained into ``runs`` while the server starts (it reads the folder on each request)."""
    proc, base = launch(slow_model, SLOW, "--runs", str(runs), "--max-batch-size", "2", "--shutdown-timeout", "5")
    train_tiny(runs / "bark-tiny")
    wait_ready(proc, base)
    yield base
    stop(proc)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's), for the module."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no {CHROMIUM}: install Debian's chromium (apt-get install chromium; make test does)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def open_page(browser, server):
    """``open_page(path, viewport=WIDE, key=True)``: a fresh page at ``server + path`` (with the API
    key in localStorage unless ``key`` is False). Fails the test on any JavaScript error."""
    contexts, errors = [], []

    def open_(path: str, viewport: dict = WIDE, key: bool = True):
        context = browser.new_context(viewport=viewport)
        context.set_default_timeout(TIMEOUT_MS)
        if key:
            context.add_init_script(f"localStorage.setItem('barkgpt-api-key', {json.dumps(KEY)})")
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server + path)
        return page

    yield open_
    for c in contexts:
        c.close()
    assert not errors, f"JavaScript errors: {errors}"


def shot(page, name: str) -> None:
    """Save a full-page screenshot as ``tests/artifacts/NAME.png``."""
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def ask(page, text: str, **settings) -> None:
    """Fill the sampling fields given (``temperature=0``...), type ``text`` and press Enter."""
    for field, value in settings.items():
        page.fill(f"#{field}", str(value))
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def last_reply(page):
    return page.locator(".msg.assistant").last


def wait_reply_done(page) -> str:
    """Wait until the reply has finished (its Copy button shows); return its text."""
    last_reply(page).locator(".copy").wait_for()
    return last_reply(page).locator(".text").text_content()


def api_chat(base: str, **body) -> dict:
    status, out = send(base + "/v1/chat/completions", json.dumps(body).encode())
    assert status == 200, out
    return out


def test_pages_are_public_and_the_run_routes_need_the_key(server, runs):
    for path in ("/", "/train", "/static/chat.js", "/static/style.css"):
        with urllib.request.urlopen(server + path, timeout=10) as r:
            assert r.status == 200
    assert send(server + "/v1/runs", key=None)[0] == 401
    assert send(server + "/v1/runs", json.dumps({"name": "x"}).encode(), key=None)[0] == 401
    status, body = send(server + "/v1/runs")
    assert status == 200 and [r["name"] for r in body["data"]] == ["bark-tiny"]
    assert body["data"][0]["status"] == "finished" and body["data"][0]["step"] == 60
    for name, code in ((".hidden", 400), ("..", 400), ("%2e%2e", 400), ("nope", 404)):
        status, err = send(f"{server}/v1/runs/{name}")
        assert status == code and set(err) == {"error"}, (name, status, err)
    for body, param in (
        ({"name": "x", "preset": "../../etc/passwd"}, "preset"),
        ({"name": "a/b"}, "name"),
        ({"name": "x", "overrides": {"out_dir": "/"}}, "overrides"),
        ({"name": "x", "overrides": {"max_iters": "many"}}, None),
        ({"name": "bark-tiny"}, "name"),
    ):
        status, err = send(server + "/v1/runs", json.dumps(body).encode())
        assert status in (400, 409) and err["error"]["param"] == param, (body, err)
    assert not (runs / "x").exists()
    status, err = send(server + "/v1/runs/bark-tiny/stop", b"{}")
    assert status == 409 and "not training" in err["error"]["message"]


def test_chat_streams_the_greedy_reply(open_page, server):
    page = open_page("/", key=False)
    # no key yet: /v1/models answers 401 and the page asks for the key
    page.locator("#key-panel").wait_for()
    assert "API key" in page.locator("#key-message").text_content()
    page.fill("#key-input", KEY)
    page.press("#key-input", "Enter")
    page.wait_for_function("() => document.getElementById('info').textContent.startsWith('model slow')")
    # record the reply's text each time the page changes it
    page.evaluate("""() => {
        window.states = [];
        new MutationObserver(() => {
            const texts = document.querySelectorAll('.msg.assistant .text');
            const text = texts.length ? texts[texts.length - 1].textContent : '';
            if (text && text !== window.states[window.states.length - 1]) window.states.push(text);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    }""")
    ask(page, "speak", temperature=0, max_tokens=40)
    text = wait_reply_done(page)
    states = page.evaluate("window.states")
    want = api_chat(server, model=SLOW, messages=[{"role": "user", "content": "speak"}], temperature=0, max_tokens=40)
    assert text == want["choices"][0]["message"]["content"] and len(text.split()) > 10
    assert len(states) >= 3, f"the reply arrived in {len(states)} step(s): {states}"
    assert all(b.startswith(a) and len(b) > len(a) for a, b in zip(states, states[1:])), states
    assert states[-1] == text
    assert page.locator(".msg.user .text").text_content() == "speak"
    assert "40 tokens" in last_reply(page).locator(".meta").text_content()
    assert page.evaluate("document.activeElement.id") == "prompt"  # ready for the next message
    ask(page, "speak", max_tokens=8, temperature=0.8, seed=1)  # a second turn, sampled
    wait_reply_done(page)
    assert page.locator(".msg.assistant").count() == 2
    shot(page, "chat-1280")
    page.click("#clear")
    assert page.locator(".msg").count() == 0


def test_stop_button_ends_a_long_reply(open_page, server):
    page = open_page("/")
    ask(page, "speak", temperature=0, max_tokens=1000)  # alone: 1000 tokens, about 4 s
    page.wait_for_function("() => (document.querySelector('.msg.assistant .text') || {}).textContent?.split(' ').length > 20")
    t0 = time.monotonic()
    page.click("#stop")
    text = wait_reply_done(page)
    assert time.monotonic() - t0 < 2
    assert "stopped" in last_reply(page).locator(".meta").text_content()
    assert 20 < len(text.split()) < 900
    assert page.locator("#send").is_visible() and not page.locator("#stop").is_visible()
    deadline = time.monotonic() + 2  # the server let go of the row
    while send(server + "/health")[1]["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert send(server + "/health")[1]["running"] == 0


def test_errors_and_incomplete_streams_are_shown(open_page):
    page = open_page("/")
    # Shift+Enter is a new line, not a send
    page.fill("#prompt", "hello")
    page.press("#prompt", "Shift+Enter")
    page.keyboard.type("there")
    assert page.input_value("#prompt") == "hello\nthere" and page.locator(".msg").count() == 0
    # an API error (400: max_tokens beyond the context) is shown, and the message comes back to retry
    ask(page, "speak", max_tokens=5000)
    error = page.locator(".msg.error").last
    error.wait_for()
    assert "5000" in error.text_content() and "context" in error.text_content()
    assert page.input_value("#prompt") == "speak"
    # a stream that ends without a finish_reason (the connection dropped) is shown too
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": SLOW,
        "choices": [{"index": 0, "delta": {"content": "woof"}, "finish_reason": None}],
    }
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(status=200, content_type="text/event-stream", body=f"data: {json.dumps(chunk)}\n\n"),
    )
    page.fill("#max_tokens", "")
    ask(page, "speak")
    page.locator(".msg.error").nth(1).wait_for()
    assert "finish_reason" in page.locator(".msg.error").nth(1).text_content()
    assert last_reply(page).locator(".text").text_content() == "woof"  # the partial reply stays visible
    # an error event in the middle of a stream is shown with its message
    page.unroute("**/v1/chat/completions")
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(
            status=200,
            content_type="text/event-stream",
            body=f"data: {json.dumps(chunk)}\n\ndata: {json.dumps({'error': {'message': 'the server shut down'}})}\n\ndata: [DONE]\n\n",
        ),
    )
    page.fill("#prompt", "")
    ask(page, "speak")
    page.locator(".msg.error").nth(2).wait_for()
    assert "the server shut down" in page.locator(".msg.error").nth(2).text_content()


def chart_count(page, series: str) -> int:
    node = page.locator(f"#loss-chart polyline[data-series={series}]")
    return int(node.get_attribute("data-count")) if node.count() else 0


def test_train_page_shows_a_finished_run(open_page):
    page = open_page("/train#bark-tiny")
    page.wait_for_function("() => document.getElementById('run-status').textContent === 'finished'")
    page.locator("#loss-chart polyline[data-series=train]").wait_for()
    assert chart_count(page, "train") == 12 and chart_count(page, "val") == 2
    assert "train: 12 points" in page.locator("#loss-chart svg").get_attribute("aria-label")
    assert page.locator("#lr-chart polyline[data-series=lr]").get_attribute("data-count") == "12"
    assert "60 / 60" in page.locator("#stats").text_content()
    assert page.locator("#samples li").count() == 2 and "User: speak Assistant:" in page.locator("#samples").text_content()
    table = page.locator("#checkpoints").text_content()
    assert "best/" in table and "last/" in table
    assert "model.n_embd" in page.locator("#config").text_content()
    assert page.locator("#load-run").is_visible() and not page.locator("#stop-run").is_visible()
    shot(page, "train-1280")


def start_run(page, name: str, **fields) -> None:
    """Fill the page's New run form (preset bark) and press Start training."""
    if not page.locator("#run-name-input").is_visible():
        page.click("#new-run summary")
    page.fill("#run-name-input", name)
    page.select_option("#preset", "bark")
    for field, value in fields.items():
        page.fill(f"[name={field}]", str(value))
    page.click("#start")
    page.wait_for_function(f"() => document.getElementById('run-title').textContent === {json.dumps(name)}")


def test_a_run_that_fails_shows_why(open_page, runs):
    page = open_page("/train")
    if not page.locator("#run-name-input").is_visible():
        page.click("#new-run summary")
    page.fill("#run-name-input", "outside")
    page.fill("[name=data]", "no/such/data")  # not under the data roots: refused before any process starts
    page.click("#start")
    page.wait_for_function("() => document.getElementById('start-error').textContent.includes('data roots')")
    assert not (runs / "outside").exists()
    (runs / "empty.txt").write_text("")  # under the runs folder (a data root), but nothing to train on
    start_run(page, "broken", data="empty.txt")
    page.wait_for_function("() => document.getElementById('run-status').textContent === 'failed'")
    assert "is empty" in page.locator("#log").text_content()
    assert not page.locator("#stop-run").is_visible() and not page.locator("#load-run").is_visible()


def test_start_and_stop_a_run_from_the_page(open_page, server, runs):
    page = open_page("/train")
    start_run(page, "live", max_iters=20000, eval_interval=100)
    assert page.locator("#start-error").text_content() == ""
    # one run at a time
    status, err = send(server + "/v1/runs", json.dumps({"name": "second"}).encode())
    assert status == 409 and "live" in err["error"]["message"]
    # the curve grows while it trains
    page.wait_for_function(
        "() => Number(document.querySelector('#loss-chart polyline[data-series=train]')?.getAttribute('data-last-x')) >= 30",
        timeout=60_000,
    )
    first = int(page.locator("#loss-chart polyline[data-series=train]").get_attribute("data-last-x"))
    page.wait_for_function(
        f"() => Number(document.querySelector('#loss-chart polyline[data-series=train]').getAttribute('data-last-x')) > {first}"
    )
    assert page.locator("#run-status").text_content() == "training"
    assert page.locator("[data-run=broken] .badge").text_content() == "failed"  # the earlier run still says so
    assert "/ 20000" in page.locator("#stats").text_content()
    assert "ETA" in page.locator("#stats").text_content() and page.locator("#stop-run").is_visible()
    shot(page, "train-live-1280")
    page.click("#stop-run")
    page.wait_for_function("() => document.getElementById('run-status').textContent === 'stopped'")
    assert (runs / "live" / "last" / "trainer_state.pt").is_file()  # SIGINT saved last/
    page.locator("#checkpoints >> text=last/").wait_for()
    assert "interrupted: saved" in page.locator("#log").text_content()


def test_pages_fit_a_phone(open_page):
    page = open_page("/", viewport=PHONE)
    assert not page.locator("#temperature").is_visible()  # the settings fold away on a phone
    page.click("#settings summary")
    ask(page, "speak", max_tokens=24, temperature=0)
    wait_reply_done(page)
    page.click("#settings summary")  # fold them away again: the conversation gets the screen
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    assert page.locator("#send").is_visible()
    shot(page, "chat-375")
    page = open_page("/train#bark-tiny", viewport=PHONE)
    page.locator("#loss-chart polyline[data-series=val]").wait_for()
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    shot(page, "train-375")


def test_load_a_finished_run_into_the_chat(open_page, server):
    page = open_page("/train#bark-tiny")
    page.click("#load-run")
    page.wait_for_url(server + "/")
    page.wait_for_function("() => document.getElementById('info').textContent.startsWith('model bark-tiny')")
    ask(page, "speak", temperature=0, max_tokens=8)
    reply = wait_reply_done(page)
    assert reply.split() and set(reply.split()) <= BARKS, reply
    assert send(server + "/v1/models")[1]["data"][0]["id"] == "bark-tiny"


def test_run_folder_readers_tolerate_files_being_written(tmp_path):
    from barkgpt.server.runfiles import read_metrics, tail, thin_rows

    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "train_loss": 2.5}\n{"step": 2, "train_loss": NaN}\n{"step": 2, "val_loss": 2.4}\n{"step": 3, "tra'
    )  # a line being appended
    rows = read_metrics(tmp_path)
    assert rows == [{"step": 1, "train_loss": 2.5}, {"step": 2, "train_loss": None}, {"step": 2, "val_loss": 2.4}]
    many = [{"step": i, "train_loss": 1.0} for i in range(1, 1001)] + [{"step": 1000, "val_loss": 1.0}]
    thinned = thin_rows(many, 100)
    assert len(thinned) <= 102 and thinned[-1] == many[-1] and thinned[-2] == many[-2] and thinned[0] == many[0]
    (tmp_path / "train.log").write_bytes(b"model: llama\rtrain 10%\rtrain 20%\n\nstep 100: val 1.2\n\xff")
    assert tail(tmp_path / "train.log", 2) == ["step 100: val 1.2", "\ufffd"]
    assert tail(tmp_path / "missing.log", 2) == []


def test_serve_refuses_a_runs_path_that_is_not_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    out = subprocess.run(
        [sys.executable, "-m", "barkgpt", "serve", "--model", str(tmp_path), "--runs", str(tmp_path / "file")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "--runs" in out.stderr and "not a folder" in out.stderr and "Traceback" not in out.stderr
