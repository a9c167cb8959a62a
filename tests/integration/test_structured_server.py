"""Structured output and tool calls against a real ``barkgpt serve`` on 127.0.0.1, through the
official ``openai`` client (``chat.completions.parse`` with a Pydantic model) and LangChain's
``ChatOpenAI(...).with_structured_output``.

The served model has random weights over a byte-level BPE trained on Shakespeare: constrained
decoding makes its replies valid whatever it has learnt, which is the point. The slow test is the
acceptance run: 200 requests over 10 schemas against a briefly trained shakespeare-bpe model.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")
from pydantic import BaseModel, Field
from test_server import KEY, launch, stop, wait_ready

pytestmark = pytest.mark.integration

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "fetch",
            "description": "fetch an item",
            "parameters": {
                "type": "object",
                "properties": {"item": {"enum": ["ball", "stick", "bone"]}},
                "required": ["item"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "bark",
            "parameters": {
                "type": "object",
                "properties": {"times": {"type": "integer", "minimum": 1, "maximum": 5}},
                "required": ["times"],
            },
        },
    },
]


class Pet(BaseModel):
    kind: Literal["dog", "cat", "fish"]
    age: int = Field(ge=0, le=30)
    name: str = Field(max_length=8)
    toys: list[Literal["ball", "bone"]] = Field(max_length=3)
    nickname: str | None = Field(max_length=6)


def save_model(out, block_size: int, words: bool = False):
    """A random-weight checkpoint: a BPE of 512 tokens trained on Shakespeare, or a word vocabulary."""
    import torch

    from barkgpt.checkpoint import save_checkpoint
    from barkgpt.config import GPTConfig
    from barkgpt.model import GPT
    from barkgpt.tokenizer import SPECIAL_TOKENS, Tokenizer

    if words:
        tok = Tokenizer.from_words([*SPECIAL_TOKENS, "yes", "no", "woof"])
    else:
        from conftest import SHARED_DATA

        text = SHARED_DATA / "tinyshakespeare.txt"
        if not text.is_file():
            pytest.skip(f"needs {text} (the shared/ folder beside the repo)")
        tok = Tokenizer.train("bpe", iter([text.read_text(encoding="utf-8")[:100_000]]), vocab_size=512)
    torch.manual_seed(0)
    cfg = GPTConfig(family="llama", block_size=block_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, vocab_size=tok.vocab_size)
    save_checkpoint(out, GPT(cfg), tok)
    return out


MODEL_DIRS: list = []  # the servers' model folders, once the fixture made them


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Two servers: the BPE model (URL first) and a word-vocabulary one; started together."""
    root = tmp_path_factory.mktemp("structured")
    MODEL_DIRS[:] = [save_model(root / "bpe", 1024), save_model(root / "words", 64, words=True)]
    procs = [launch(MODEL_DIRS[0], "m"), launch(MODEL_DIRS[1], "w")]
    try:
        for proc, base in procs:
            wait_ready(proc, base)
        yield [base for _, base in procs]
    finally:
        for proc, _ in procs:
            proc.terminate()  # both shut down at once
        for proc, _ in procs:
            stop(proc)


@pytest.fixture
def client(servers):
    return openai.OpenAI(base_url=servers[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def chat(client, **kw):
    return client.chat.completions.create(model="m", messages=[{"role": "user", "content": "A pet:"}], **kw)


def test_openai_parse_gives_the_pydantic_model(client):
    for seed in range(3):
        r = client.chat.completions.parse(
            model="m", messages=[{"role": "user", "content": "A pet:"}], response_format=Pet, max_tokens=200, seed=seed
        )
        pet = r.choices[0].message.parsed
        assert isinstance(pet, Pet), r.choices[0].message.content
        jsonschema.validate(json.loads(r.choices[0].message.content), Pet.model_json_schema())


def test_langchain_with_structured_output(servers):
    pytest.importorskip("langchain_openai")
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=servers[0] + "/v1", api_key=KEY, model="m", max_tokens=200, temperature=0.7, max_retries=0)
    assert isinstance(llm.with_structured_output(Pet).invoke("A pet:"), Pet)


def test_json_object_choice_regex_and_echo(client):
    r = chat(client, max_tokens=200, response_format={"type": "json_object"}, temperature=0)
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    for seed in range(3):
        r = chat(client, max_tokens=20, seed=seed, extra_body={"structured_outputs": {"choice": ["yes", "no", "not sure"]}})
        assert r.choices[0].message.content in ("yes", "no", "not sure")
        assert r.choices[0].finish_reason == "stop"
        r = client.completions.create(
            model="m", prompt="Code:", max_tokens=20, seed=seed, extra_body={"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}}
        )
        text = r.choices[0].text
        assert len(text) == 6 and text[:3].isdigit() and text[3] == "-" and text[4:].isalpha()
    r = client.completions.create(
        model="m", prompt="Is it?", max_tokens=5, echo=True, extra_body={"structured_outputs": {"choice": ["yes"]}}
    )
    assert r.choices[0].text == "Is it?yes"


def test_max_tokens_inside_json_gives_length(client):
    r = chat(
        client,
        max_tokens=4,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": Pet.model_json_schema()}},
    )
    assert r.choices[0].finish_reason == "length"


def test_logit_bias_bans_the_greedy_token(client, tmp_path_factory):
    from barkgpt.tokenizer import Tokenizer

    tok = Tokenizer.load(MODEL_DIRS[0])
    first = chat(client, max_tokens=1, temperature=0, logprobs=True).choices[0].logprobs.content[0]
    tid = next(i for i in range(tok.vocab_size) if list(tok.id_to_bytes(i)) == first.bytes)
    banned = chat(client, max_tokens=1, temperature=0, logprobs=True, logit_bias={str(tid): -100}).choices[0].logprobs.content[0]
    assert banned.bytes != first.bytes


def test_tool_choice_required_and_named_calls(client):
    for mode in ("required", {"type": "function", "function": {"name": "bark"}}):
        r = chat(client, max_tokens=80, tools=TOOLS, tool_choice=mode, parallel_tool_calls=False, temperature=0)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0]
        assert call.id.startswith("call_") and call.type == "function"
        params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), params)
        if isinstance(mode, dict):
            assert call.function.name == "bark"
        pieces = list(
            chat(client, max_tokens=80, tools=TOOLS, tool_choice=mode, parallel_tool_calls=False, temperature=0, stream=True)
        )
        deltas = [d for p in pieces for d in (p.choices[0].delta.tool_calls or [])]
        assert deltas[0].id and deltas[0].function.name == call.function.name
        assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
        assert pieces[-1].choices[0].finish_reason == "tool_calls"


def test_tool_messages_go_back_into_the_template(client):
    messages = [
        {"role": "user", "content": "fetch the ball"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "fetch", "arguments": '{"item": "ball"}'}}],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "got it"},
    ]
    r = client.chat.completions.create(model="m", messages=messages, tools=TOOLS, tool_choice="none", max_tokens=5)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")


def test_bad_constraints_get_400s_that_say_why(client, servers):
    def expect_400(match, base=None, **kw):
        c = client if base is None else openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
        with pytest.raises(openai.BadRequestError, match=match):
            c.chat.completions.create(
                model="m" if base is None else "w", messages=[{"role": "user", "content": "yes"}], max_tokens=5, **kw
            )

    expect_400("cannot write the requested json object", servers[1], response_format={"type": "json_object"})
    expect_400(
        "does not compile: Invalid type",
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}},
    )
    expect_400("not in tools", tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    expect_400("needs tools", tool_choice="required")
    deep: dict = {"type": "string"}
    for _ in range(40):
        deep = {"type": "array", "items": deep}
    expect_400("nests deeper", response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": deep}})
    huge = {"type": "object", "properties": {f"k{i}": {"type": "string", "description": "x" * 200} for i in range(300)}}
    expect_400("characters, more than", response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": huge}})
    expect_400("choice", extra_body={"structured_outputs": {"choice": ["a"] * 1000}})
    expect_400("one constraint", response_format={"type": "json_object"}, extra_body={"structured_outputs": {"regex": "a+"}})
    expect_400("logit_bias", logit_bias={"99999": 5})


# ---- acceptance: 200 requests, 10 schemas, a briefly trained shakespeare-bpe model --------------------

SCHEMAS = [
    {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
    },
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {
        "type": "object",
        "properties": {"mood": {"enum": ["happy", "sad", "angry"]}, "level": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["mood"],
    },
    {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 3}},
        "required": ["tags"],
    },
    {
        "type": "object",
        "properties": {
            "who": {
                "type": "object",
                "properties": {"first": {"type": "string", "maxLength": 8}, "last": {"type": "string", "maxLength": 8}},
                "required": ["first"],
            }
        },
        "required": ["who"],
    },
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 2, "maxItems": 4},
    {
        "type": "object",
        "properties": {
            "act": {"type": "integer", "minimum": 1, "maximum": 5},
            "scene": {"type": "integer", "minimum": 1, "maximum": 9},
            "speaker": {"enum": ["ROMEO", "JULIET", "NURSE"]},
        },
        "required": ["act", "scene", "speaker"],
    },
    {
        "type": "object",
        "properties": {"line": {"type": "string", "maxLength": 20}, "note": {"type": ["string", "null"], "maxLength": 5}},
        "required": ["line"],
    },
    {
        "type": "object",
        "properties": {
            "points": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "x": {"type": "integer", "minimum": 0, "maximum": 9},
                        "y": {"type": "integer", "minimum": 0, "maximum": 9},
                    },
                    "required": ["x", "y"],
                },
                "maxItems": 2,
            }
        },
        "required": ["points"],
    },
    {"type": "string", "enum": ["yes", "no", "perhaps"]},
]


@pytest.mark.slow
def test_two_hundred_schema_requests_all_parse_and_validate(tmp_path_factory):
    """10 schemas x 20 requests (temperature 1, seeds 0..19) against the shakespeare-bpe preset
    trained for 150 iterations: every reply parses and validates."""
    import subprocess

    out = tmp_path_factory.mktemp("acceptance") / "shakespeare-bpe"
    from conftest import SHARED_DATA

    text = SHARED_DATA / "tinyshakespeare.txt"
    if not text.is_file():
        pytest.skip(f"needs {text}")
    subprocess.run(
        [sys.executable, "-m", "barkgpt", "train", "--preset", "shakespeare-bpe", "--data", str(text), "--out-dir", str(out),
         "--max-iters", "150", "--warmup-iters", "20", "--eval-interval", "150", "--eval-iters", "2", "--compile", "false"],
        check=True, capture_output=True,
    )  # fmt: skip
    proc, base = launch(out, "s")
    try:
        wait_ready(proc, base)
        c = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=300)

        def one(job):
            schema, seed = job
            fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
            r = c.chat.completions.create(
                model="s",
                messages=[{"role": "user", "content": "ROMEO:"}],
                response_format=fmt,
                max_tokens=100,
                temperature=1.0,
                seed=seed,
            )
            jsonschema.validate(json.loads(r.choices[0].message.content), schema)
            return r.choices[0].finish_reason

        with ThreadPoolExecutor(8) as pool:
            reasons = list(pool.map(one, [(s, seed) for s in SCHEMAS for seed in range(20)]))
        assert reasons == ["stop"] * 200
    finally:
        stop(proc)
