"""The pieces of the server that the split out of ``create_app`` made reachable alone (issue 14):
the context-length check that sets ``max_new_tokens``, usage counting, the model-id check, the
model host before a model is attached, and the error handlers on a bare app."""

from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")

from barkgpt.common import BarkError
from barkgpt.config import ServeConfig
from barkgpt.server import native_protocol as N
from barkgpt.server import protocol as P
from barkgpt.server.errors import ApiError
from barkgpt.server.host import ModelHost
from barkgpt.server.serving import check_model, sampling_for
from barkgpt.server.streaming import count_usage


def test_sampling_for_fills_the_rest_of_the_context_or_names_what_does_not_fit():
    ids = list(range(10))
    assert sampling_for(ids, P.CompletionRequest(prompt="x"), 32).max_new_tokens == 22  # the rest of the context
    assert (
        sampling_for(
            ids, P.ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], max_completion_tokens=22), 32
        ).max_new_tokens
        == 22
    )
    assert sampling_for(ids, N.GenerateRequest(prompt="x", max_tokens=5), 32).max_new_tokens == 5
    with pytest.raises(ApiError) as e:
        sampling_for(ids, P.CompletionRequest(prompt="x", max_tokens=23), 32)
    assert (e.value.status, e.value.param, e.value.code) == (400, "max_tokens", "context_length_exceeded")
    assert "10 tokens and max_tokens is 23" in e.value.message and "32 tokens" in e.value.message
    with pytest.raises(ApiError) as e:  # no room left at all: the prompt is at fault, whatever max_tokens says
        sampling_for(list(range(32)), P.CompletionRequest(prompt="x", max_tokens=1), 32)
    assert (e.value.param, e.value.code) == ("prompt", "context_length_exceeded")


def test_usage_counts_a_prompt_shared_by_n_choices_once():
    # prepare() gives the prompt's tokens to the first choice of each prompt and 0 to the others
    choices = [SimpleNamespace(prompt_tokens=p, decoder=SimpleNamespace(n_tokens=n)) for p, n in ((7, 3), (0, 5), (4, 1))]
    assert count_usage(choices) == P.Usage(prompt_tokens=11, completion_tokens=9, total_tokens=20)


def test_check_model_and_a_host_without_a_model():
    host = ModelHost(ServeConfig(model_name="m"))
    check_model(host, None)
    check_model(host, "m")
    with pytest.raises(ApiError) as e:
        check_model(host, "gpt-4")
    assert (e.value.status, e.value.code, e.value.param) == (404, "model_not_found", "model")
    with pytest.raises(ApiError) as e:
        host.ready()
    assert (e.value.status, e.value.code, e.value.headers) == (503, "model_loading", {"Retry-After": "1"})
    host.draining = True
    with pytest.raises(ApiError) as e:
        host.ready()
    assert e.value.code == "shutting_down"


def test_the_error_handlers_shape_every_error_like_openai(tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from barkgpt.server.errors import add_error_handlers

    app = FastAPI()
    add_error_handlers(app, lambda: {tmp_path: "runs"})

    @app.post("/fail")
    def fail(body: N.TokenizeRequest):
        raise BarkError(f"{tmp_path}/x/best/model.safetensors is corrupt; see /etc/secret.yaml")

    client = TestClient(app, raise_server_exceptions=False)
    r = client.post("/fail", json={"prompt": "hi"})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "runs/x/best/model.safetensors is corrupt; see .../secret.yaml"
    r = client.post("/fail", json={})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "prompt")
    r = client.post("/fail", content=b"{", headers={"Content-Type": "application/json"})
    assert r.json()["error"] == {
        "message": "the body is not valid JSON",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    assert client.get("/nowhere").json()["error"]["message"] == "no route GET /nowhere"
    assert (client.get("/fail").status_code, client.get("/fail").json()["error"]["message"]) == (
        405,
        "GET is not allowed on /fail",
    )


TRICKY_TEXTS = [
    "",
    "plain",
    ' "quoted" \\ back',
    "line\nbreak\ttab\r",
    "\x00\x01\x1f\x7f",
    "é日本🎉",
    "\u2028\u2029",
    "</script>",
]


def test_chunk_template_is_byte_for_byte_pydantic_for_completion_and_chat_chunks():
    """The per-token fast path renders exactly what the pydantic chunk dumps, for every index."""
    from barkgpt.server.streaming import ChunkTemplate

    def completion(i, text):
        return P.CompletionResponse(id="cmpl-1", created=7, model='m"\\odel', choices=[P.CompletionChoice(text=text, index=i)])

    def chat(i, text):
        choice = P.ChatChunkChoice(index=i, delta=P.DeltaMessage(content=text))
        return P.ChatCompletionChunk(id="chatcmpl-1", created=7, model="m", choices=[choice])

    for build in (completion, chat):
        template = ChunkTemplate(build)
        for i in (0, 3, 0):
            for text in TRICKY_TEXTS:
                assert template.render(i, text) == build(i, text).model_dump_json(), (build.__name__, i, text)
