"""A real ``barkgpt serve`` process on 127.0.0.1, driven by the official ``openai`` client.

The model is the Bark toy, trained for a few seconds in a module fixture, so greedy replies are
barks rather than noise. The server runs with one torch thread: on a shared 2-core machine
OpenMP's spinning threads make tiny models several times slower.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.integration

KEY = "test-key"
MODEL = "bark-test"
PROMPT = "User: speak Assistant:"
BARKS = {"woof", "arf", "ruff", "grrr", "yip", "bark"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    import torch

    from barkgpt.config import GPTConfig, TrainConfig
    from barkgpt.train import train

    out = tmp_path_factory.mktemp("serve") / "bark"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(
            GPTConfig(family="llama", block_size=32, n_layer=2, n_head=2, n_kv_head=2, n_embd=32),
            TrainConfig(
                data="bark",
                out_dir=str(out),
                batch_size=16,
                max_iters=80,
                warmup_iters=10,
                learning_rate=1e-2,
                min_lr=1e-3,
                eval_interval=80,
                eval_iters=2,
                log_interval=40,
                seed=0,
            ),
            quiet=True,
        )
    finally:
        torch.set_num_threads(threads)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(model_dir, name: str, *flags: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``barkgpt serve`` on a free port (API key ``KEY``); return the process and base URL.

    Eager (``--compile false``) unless ``flags`` say otherwise: compiling the decode step before
    ``/health`` turns 200 costs 5-20 s per start on 2 cores, so only the main ``server`` compiles."""
    port = free_port()
    flags = flags if "--compile" in flags else ("--compile", "false", *flags)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BARKGPT_API_KEY": KEY, **(env or {})}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "barkgpt",
            "serve",
            "--model",
            str(model_dir),
            "--port",
            str(port),
            "--model-name",
            name,
            "--device",
            "cpu",
            *flags,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, base: str) -> list[tuple[int, dict]]:
    """Poll ``/health`` until it answers 200; return the (status, body) answers seen before.
    Gives up after 180 s: a compiling server on a loaded 2-core machine can take a minute."""
    seen = []
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return seen
        except urllib.error.HTTPError as e:
            seen.append((e.code, json.loads(e.read())))
        except (urllib.error.URLError, ConnectionError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"barkgpt serve did not come up:\n{proc.stdout.read()}")
        time.sleep(0.05)


def stop(proc: subprocess.Popen) -> int:
    """SIGTERM the server and return its exit status (killed after 15 s)."""
    proc.terminate()
    try:
        return proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def start_server(model_dir, name: str, *flags: str):
    """Start ``barkgpt serve`` on a free port (API key ``KEY``); yield its base URL; SIGTERM it."""
    proc, base = launch(model_dir, name, *flags)
    wait_ready(proc, base)
    yield base
    stop(proc)


@pytest.fixture(scope="module")
def server(run_dir):
    """Base URL of a running server on the trained Bark toy, decoding with the compiled step
    (the default) and the prefix cache (the default)."""
    yield from start_server(run_dir, MODEL, "--compile", "true")


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=30)


def send(url: str, body: bytes | None = None, key: str | None = KEY) -> tuple[int, dict]:
    """POST ``body`` (GET when None) with ``key``; (status, JSON body), also for error answers."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url, data=body, headers=headers)  # urllib POSTs when there is data
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_completion_and_chat(client):
    c = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    assert c.object == "text_completion" and c.model == MODEL
    assert c.choices[0].text.split()[0] in BARKS, c.choices[0].text
    assert c.usage.prompt_tokens == 3 and c.usage.total_tokens == 3 + c.usage.completion_tokens
    assert c.choices[0].finish_reason in {"stop", "length"}

    chat = client.chat.completions.create(
        messages=[{"role": "user", "content": [{"type": "text", "text": "speak"}]}],
        model=MODEL,
        temperature=0,
        max_completion_tokens=8,
    )
    msg = chat.choices[0].message
    assert msg.role == "assistant" and msg.content.split()[0] in BARKS and not msg.content[0].isspace()
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL] and client.models.retrieve(MODEL).id == MODEL


def test_streaming_chat_with_usage_equals_non_streamed(client):
    messages = [{"role": "user", "content": "speak"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=10)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, temperature=0, max_tokens=10, stream=True, stream_options={"include_usage": True}
        )
    )
    assert len({(c.id, c.created) for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.delta.role is None for c in chunks[1:] for ch in c.choices)
    assert sum(1 for c in chunks for ch in c.choices if ch.finish_reason) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
    assert text == whole.choices[0].message.content

    no_usage = list(client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=10, stream=True))
    assert all(c.choices for c in no_usage)


def test_streamed_completion_equals_non_streamed(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=["grrr"])
    whole = client.completions.create(**kw)
    text = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
    assert text == whole.choices[0].text and "grrr" not in text


def test_errors_have_openai_shapes(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match="40 tokens.*32"):
        client.completions.create(model=MODEL, prompt="woof " * 40, max_tokens=5)
    with pytest.raises(openai.BadRequestError, match="max_tokens is 40"):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, stream=True)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()

    status, body = send(server + "/v1/completions", b'{"prompt": "x", "n": "many"}')
    assert status == 400 and set(body) == {"error"} and body["error"]["param"] == "n"
    status, body = send(server + "/v1/nothing-here", b"{}")
    assert status == 404 and body["error"]["type"] == "not_found_error"
    status, body = send(server + "/v1/completions", b'{"prompt": "' + b"a" * (2 << 20) + b'"}')
    assert status == 413 and body["error"]["code"] == "request_too_large"
    with urllib.request.urlopen(server + "/health") as r:  # no key needed
        assert json.loads(r.read())["model"] == MODEL


def test_generate_tokenize_detokenize(server):
    status, body = send(server + "/generate", json.dumps({"prompt": PROMPT, "temperature": 0, "max_tokens": 4}).encode())
    assert status == 200 and body["message"].split()[0] in BARKS
    status, other = send(server + "/generate", json.dumps({"prompt": "User:", "temperature": 0, "max_tokens": 4}).encode())
    assert status == 200 and other["message"] != body["message"]  # the prompt is really used
    status, tok = send(server + "/tokenize", json.dumps({"prompt": PROMPT}).encode())
    assert status == 200 and tok["count"] == 3 and tok["max_model_len"] == 32
    status, detok = send(server + "/detokenize", json.dumps({"tokens": tok["tokens"]}).encode())
    assert status == 200 and detok["prompt"] == PROMPT


def test_sixteen_concurrent_streams_match_each_alone(client, server):
    words = ["speak", "bark", "woof", "sit", "hello", "speak speak", "good dog", "arf"]
    alone = {
        w: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": w}], temperature=0, max_tokens=12)
        .choices[0]
        .message.content
        for w in words
    }

    async def main():
        aclient = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)

        async def one(w):
            stream = await aclient.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": w}], temperature=0, max_tokens=12, stream=True
            )
            return "".join([ch.delta.content or "" async for c in stream for ch in c.choices])

        try:
            return await asyncio.gather(*(one(w) for w in words * 2))
        finally:
            await aclient.close()

    together = asyncio.run(main())
    assert together == [alone[w] for w in words * 2]


def test_metrics_count_requests_tokens_and_latency(client, server):
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
    send(server + "/v1/completions", json.dumps({"prompt": PROMPT, "temperature": -1}).encode())
    req = urllib.request.Request(server + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            values[key] = float(value)
    assert values['barkgpt_requests_total{route="/v1/completions",status="200"}'] >= 1
    assert values['barkgpt_requests_total{route="/v1/completions",status="400"}'] >= 1
    assert values["barkgpt_generation_tokens_total"] >= 3
    assert values["barkgpt_prompt_tokens_total"] >= 3
    assert values["barkgpt_time_to_first_token_seconds_count"] >= 1
    assert values["barkgpt_inter_token_latency_seconds_count"] >= 2
    assert values["barkgpt_requests_running"] == 0
    assert "barkgpt_requests_waiting" in values


def test_fuzzed_requests_never_get_a_5xx(server):
    """Property-based: random JSON bodies on the /v1 routes get 2xx or 4xx, never 5xx."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=True), st.text(max_size=20))
    values = st.recursive(
        scalars,
        lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
        max_leaves=6,
    )
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "tool", 7]), "content": st.one_of(st.text(max_size=30), values)}
    )
    fields = {
        "model": st.one_of(st.just(MODEL), values),
        "prompt": st.one_of(st.text(max_size=40), values),
        "messages": st.one_of(st.lists(message, max_size=3), values),
        "max_tokens": st.one_of(st.integers(-5, 40), values),
        "temperature": st.one_of(st.floats(-2, 3), values),
        "top_p": st.one_of(st.floats(-1, 2), values),
        "top_k": st.one_of(st.integers(-3, 50), values),
        "n": st.one_of(st.integers(-1, 20), values),
        "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=6), values),
        "seed": st.one_of(st.integers(-(2**70), 2**70), values),
        "stream": st.one_of(st.booleans(), values),
        "logprobs": values,
        "stream_options": values,
        "min_p": values,
        "repetition_penalty": values,
    }
    bodies = st.fixed_dictionaries({}, optional=fields)

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(route=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=bodies)
    def check(route, body):
        if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 8:
            body["max_tokens"] = 8  # keep each request short
        data = json.dumps(body, allow_nan=True).encode()
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
        req = urllib.request.Request(server + route, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                status = r.status
                r.read()
        except urllib.error.HTTPError as e:
            status = e.code
            payload = json.loads(e.read())
            assert set(payload) == {"error"} and {"message", "type", "param", "code"} <= set(payload["error"])
        assert status < 500, (route, body)

    check()


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """A random model with a 1024-token context, whose replies run long (greedy: no early <EOS>)."""
    import torch

    from barkgpt.bark import bark_tokenizer
    from barkgpt.checkpoint import save_checkpoint
    from barkgpt.config import GPTConfig
    from barkgpt.model import GPT

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=1024, n_layer=2, n_head=2, n_embd=32, vocab_size=11))
    out = tmp_path_factory.mktemp("long") / "long"
    save_checkpoint(out, model, bark_tokenizer())
    return out


@pytest.fixture(scope="module")
def long_server(long_model):
    """A server on ``long_model``."""
    yield from start_server(long_model, "long")


def health(base: str) -> dict:
    with urllib.request.urlopen(base + "/health", timeout=10) as r:
        return json.loads(r.read())


def test_abandoned_streams_free_their_slots(long_server):
    import http.client

    port = int(long_server.rsplit(":", 1)[1])
    body = json.dumps({"model": "long", "prompt": PROMPT, "max_tokens": 1000, "temperature": 0, "stream": True})
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    # precondition: alone, this reply runs to its 1000 tokens (no early <EOS>)
    t0 = time.monotonic()
    status, whole = send(long_server + "/v1/completions", json.dumps({**json.loads(body), "stream": False}).encode())
    solo_s = time.monotonic() - t0
    assert status == 200 and whole["usage"]["completion_tokens"] == 1000
    conns = []
    for _ in range(20):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("POST", "/v1/completions", body=body, headers=headers)
        r = c.getresponse()
        assert r.status == 200
        r.fp.readline()  # the first chunk has arrived: the request is running
        conns.append((c, r))
    assert health(long_server)["running"] > 0
    for c, r in conns:  # the clients go away mid-stream
        r.close()
        c.close()
    # Left running, the 20 rows would need about solo_s or more to finish (a batched step is no
    # faster than a solo one); freed rows leave within a few decode steps.
    deadline = time.monotonic() + solo_s / 2
    while health(long_server)["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health(long_server)["running"] == 0, f"abandoned rows still running after {solo_s / 2:.1f} s"
    status, out = send(
        long_server + "/v1/completions",
        json.dumps({"model": "long", "prompt": PROMPT, "max_tokens": 5, "temperature": 0}).encode(),
    )
    assert status == 200 and out["usage"]["completion_tokens"] == 5


def test_frequency_penalty_changes_a_repetitive_greedy_reply(client):
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0).choices[0].text.split()
    penalised = (
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, frequency_penalty=2.0)
        .choices[0]
        .text.split()
    )
    assert len(set(plain)) < len(plain)  # greedy repeats itself...
    assert penalised != plain  # ...and the penalty steers away from the repeats


def test_logprobs_are_the_models_own(client):
    """Chat and legacy logprobs: one entry per completion token, each <= 0, the greedy token is
    the top one, and the distribution is the model's, unchanged by temperature and penalties."""
    messages = [{"role": "user", "content": "speak"}]
    chat = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=6, logprobs=True, top_logprobs=5
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True) and all(lp <= 0 for lp in tops)
        assert entry.logprob == tops[0] and entry.token == entry.top_logprobs[0].token  # greedy: the top token
        assert bytes(entry.bytes).decode() == entry.token
    assert "".join(e.token for e in content[:1]) in chat.choices[0].message.content
    hot = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        temperature=1.5,
        seed=3,
        max_tokens=1,
        frequency_penalty=2.0,
        logprobs=True,
        top_logprobs=5,
    )
    assert hot.choices[0].logprobs.content[0].top_logprobs == content[0].top_logprobs  # raw, not tempered

    comp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == comp.usage.completion_tokens
    assert all(t == max(top.values()) and t <= 0 for t, top in zip(lp.token_logprobs, lp.top_logprobs))
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).choices[0].logprobs is None

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            temperature=0,
            max_tokens=6,
            stream=True,
            logprobs=True,
            top_logprobs=5,
            stream_options={"include_usage": True},
        )
    )
    streamed = [e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert streamed == content and chunks[-1].usage.completion_tokens == len(content)

    for bad in (dict(logprobs=True, top_logprobs=50), dict(top_logprobs=2)):
        with pytest.raises(openai.BadRequestError, match="top_logprobs"):
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, **bad)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, logprobs=6)


CORS_ORIGIN = "http://ui.example:5173"


@pytest.fixture(scope="module")
def loading_server(long_model):
    """A server whose model load is held back 1.5 s (test-only BARKGPT_TEST_LOAD_DELAY), with CORS
    on for ``CORS_ORIGIN``. Yields its base URL and the first /health and /v1/models answers,
    taken as soon as the port opened."""
    proc, base = launch(long_model, "long", "--cors-origin", CORS_ORIGIN, env={"BARKGPT_TEST_LOAD_DELAY": "1.5"})
    first = None
    deadline = time.monotonic() + 60
    while first is None and proc.poll() is None and time.monotonic() < deadline:
        try:
            first = [send(base + path) for path in ("/health", "/v1/models")]
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.05)
    if first is None:
        proc.kill()
        pytest.fail(f"barkgpt serve did not open its port:\n{proc.stdout.read()}")
    yield base, proc, first
    stop(proc)


def test_health_is_503_until_the_model_loads(loading_server):
    base, proc, first = loading_server
    for status, body in first:  # while the model loads: /health and the model routes
        assert status == 503 and body["error"]["code"] == "model_loading", body
    before = wait_ready(proc, base)
    assert before and all(status == 503 for status, _ in before)
    status, body = send(base + "/health")
    assert status == 200 and body["model"] == "long"
    status, body = send(
        base + "/v1/chat/completions",
        json.dumps({"messages": [{"role": "user", "content": "speak"}], "max_tokens": 2, "temperature": 0}).encode(),
    )
    assert status == 200 and body["usage"]["completion_tokens"] == 2  # greedy: no chance <EOS> ends it early


def preflight(base: str, origin: str):
    """A browser's CORS preflight for a POST to /v1/chat/completions; returns the response."""
    conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=10)
    conn.request(
        "OPTIONS",
        "/v1/chat/completions",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    r = conn.getresponse()
    r.read()
    conn.close()
    return r


def test_cors_only_with_cors_origin(loading_server, server):
    base = loading_server[0]
    allowed = preflight(base, CORS_ORIGIN)
    assert allowed.status == 200 and allowed.getheader("Access-Control-Allow-Origin") == CORS_ORIGIN
    assert "POST" in allowed.getheader("Access-Control-Allow-Methods")
    assert preflight(base, "http://elsewhere.example").getheader("Access-Control-Allow-Origin") is None
    assert preflight(server, CORS_ORIGIN).getheader("Access-Control-Allow-Origin") is None  # no --cors-origin


def open_stream(base: str, max_tokens: int):
    """Start a streamed greedy completion; return the connection and response, its first event read."""
    conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=30)
    conn.request(
        "POST",
        "/v1/completions",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
        body=json.dumps(
            {
                "prompt": PROMPT,
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        ),
    )
    r = conn.getresponse()
    assert r.status == 200
    assert r.readline().startswith(b"data: {")  # the request is running
    return conn, r


def events(r) -> list[tuple[float, str]]:
    """The rest of an SSE stream: (arrival time, data) per event, up to the connection's end."""
    out = []
    for line in iter(r.readline, b""):
        if line.startswith(b"data: "):
            out.append((time.monotonic(), line[6:].decode().strip()))
    return out


def refused(base: str) -> bool:
    """Whether a new request to the server is refused (connection refused or 503)."""
    try:
        with urllib.request.urlopen(base + "/health", timeout=2):
            return False
    except urllib.error.HTTPError as e:
        return e.code == 503
    except (urllib.error.URLError, ConnectionError):
        return True


@pytest.fixture
def own_server(long_model):
    """Start servers on ``long_model`` with ``launch(*flags)``; kills any left running at the end."""
    procs = []

    def start(*flags):
        proc, base = launch(long_model, "long", *flags)
        procs.append(proc)
        wait_ready(proc, base)
        return proc, base

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_lets_a_running_stream_finish(own_server):
    proc, base = own_server()
    conn, r = open_stream(base, 600)
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while not refused(base) and time.monotonic() < deadline:
        time.sleep(0.02)
    refused_at = time.monotonic()
    rest = events(r)
    conn.close()
    assert rest[-1][1] == "[DONE]" and refused_at < rest[-2][0]  # still streaming after new requests were refused
    data = [json.loads(d) for _, d in rest[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in data if c["choices"]][-1] == "length"
    assert data[-1]["usage"]["completion_tokens"] == 600 and not any("error" in c for c in data)
    assert proc.wait(timeout=15) == 0


def test_shutdown_timeout_ends_a_stream_with_an_error_event(own_server):
    """A stream still running when --shutdown-timeout runs out gets an error event, then [DONE]."""
    proc, base = own_server("--shutdown-timeout", "0")
    conn, r = open_stream(base, 1000)
    proc.send_signal(signal.SIGTERM)
    rest = [d for _, d in events(r)]
    conn.close()
    assert rest[-1] == "[DONE]"
    error = json.loads(rest[-2])["error"]
    assert error["code"] == "shutting_down" and "shut down" in error["message"]
    assert not any('"finish_reason":"length"' in d for d in rest)
    assert proc.wait(timeout=15) == 0


def test_bad_serve_flags_fail_fast_with_one_line(long_model):
    for flags, words in (
        (["--max-batch-size", "0"], "max_batch_size"),
        (["--port", "x"], "--port"),
        (["--api-key", "a", "--api-key-file", "k.txt"], "not both"),
    ):
        out = subprocess.run(
            [sys.executable, "-m", "barkgpt", "serve", "--model", str(long_model), *flags],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 2 and words in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_health_waits_for_the_compiled_step(server):
    """The main server compiled its decode step before /health turned 200 (no fallback)."""
    status, body = send(server + "/health")
    assert status == 200 and body["compile"] is True


def chat_turns(client, turns: list[str], **sampling) -> list[str]:
    """A multi-turn chat: each turn sends the whole conversation so far; returns the replies."""
    messages, replies = [], []
    for text in turns:
        messages.append({"role": "user", "content": text})
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, **sampling)
        replies.append(reply.choices[0].message.content)
        messages.append({"role": "assistant", "content": replies[-1]})
    return replies


def metric(base: str, name: str) -> float:
    req = urllib.request.Request(base + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def test_prefix_cache_reuses_earlier_turns_and_changes_no_token(client, server, run_dir):
    """A multi-turn chat reuses the KV entries of earlier turns (hits on /metrics) and gets the
    replies of a server started with --no-prefix-cache, greedy and seeded."""
    turns = ["speak", "bark", "speak speak"]
    hits = metric(server, "barkgpt_prefix_cache_hits")
    cached = [chat_turns(client, turns, temperature=0), chat_turns(client, turns, temperature=1.0, seed=5)]
    assert metric(server, "barkgpt_prefix_cache_hits") > hits
    assert 0 < metric(server, "barkgpt_prefix_cache_hit_rate") <= 1
    proc, base = launch(run_dir, MODEL, "--no-prefix-cache")
    try:
        wait_ready(proc, base)
        plain = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=30)
        assert [chat_turns(plain, turns, temperature=0), chat_turns(plain, turns, temperature=1.0, seed=5)] == cached
        assert metric(base, "barkgpt_prefix_cache_hits") == 0 and send(base + "/health")[1]["compile"] is False
    finally:
        stop(proc)
