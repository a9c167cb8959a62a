"""The bark-agent set (barkgpt.bark): generated tool-call conversations, how they render and mask,
the reply parser and call checker of ``barkgpt eval --bark-agent``, and a short training run."""

import json
import random

import pytest

from barkgpt.bark import (
    AGENT_TOOLS,
    agent_answers,
    bark_agent_conversations,
    bark_agent_eval,
    bark_agent_rows,
    parse_agent_reply,
    run_agent_tool,
    sample_agent_request,
    valid_agent_call,
)
from barkgpt.conversations import ChatRows, encode_conversation
from barkgpt.data import builtin_dataset
from barkgpt.tokenizer import CHAT_TOKENS_TEMPLATE


@pytest.fixture(scope="module")
def rows() -> ChatRows:
    """The set's data and tokenizer at a test's size (160 conversations)."""
    return bark_agent_rows(160, seed=3)


def tool_requests(conversations):
    """(user text, tool name, arguments) of every tool request in ``conversations``."""
    out = []
    for c in conversations:
        m = c["messages"]
        for i, msg in enumerate(m):
            if msg.get("tool_calls"):
                fn = msg["tool_calls"][0]["function"]
                out.append((m[i - 1]["content"], fn["name"], json.loads(fn["arguments"])))
    return out


def test_conversations_are_openai_rows_with_tools_and_matching_results():
    convs = bark_agent_conversations(400, seed=1)
    assert convs == bark_agent_conversations(400, seed=1) and convs != bark_agent_conversations(400, seed=2)
    names = {t["function"]["name"] for t in AGENT_TOOLS}
    seen = set()
    for c in convs:
        assert {t["function"]["name"] for t in c["tools"]} <= names and c["tools"]
        m = c["messages"]
        assert m[-1]["role"] == "assistant" and isinstance(m[-1]["content"], str)  # ends in words
        for i, msg in enumerate(m):
            if msg["role"] != "tool":
                continue
            (call,) = m[i - 1]["tool_calls"]  # a result follows its call, with the call's id
            assert msg["tool_call_id"] == call["id"] and len(call["id"]) == len("call_") + 24
            fn = call["function"]
            assert fn["name"] in {t["function"]["name"] for t in c["tools"]}  # only offered tools are called
            assert valid_agent_call({"name": fn["name"], "arguments": json.loads(fn["arguments"])}, c["tools"])
            assert m[i + 1]["content"] in agent_answers(fn["name"], json.loads(fn["arguments"]), msg["content"])
            seen.add(fn["name"])
    assert seen == names
    talk = sum(
        1
        for c in convs
        for i, msg in enumerate(c["messages"][1:], 1)
        if msg["role"] == "assistant" and msg["content"] and c["messages"][i - 1]["role"] == "user"
    )
    assert talk > 40  # some requests need no tool


def test_held_out_requests_never_appear_in_training():
    trained = {text for text, _, _ in tool_requests(bark_agent_conversations(1200, seed=0))}
    rng = random.Random(0)
    held = [sample_agent_request(rng, held_out=True) for _ in range(300)]
    assert {r["name"] for r in held} == {"fetch", "bark", "weather"}
    assert not trained & {r["text"] for r in held}
    assert len({r["text"] for r in held}) > 60  # varied, not a handful


def test_rendered_training_text_is_what_the_server_renders(rows):
    """A conversation trains on the tokens the chat template gives for the same request (its tools
    included), learning the assistant's calls and words but not the tool's result."""
    tok = rows.tokenizer
    assert tok.kind == "bpe" and tok.chat_template == CHAT_TOKENS_TEMPLATE
    conv = next(c for c in rows.splits["train"] if any(m["role"] == "tool" for m in c["messages"]))
    text = tok.apply_chat_template(conv["messages"], add_generation_prompt=False, tools=conv["tools"])
    assert tok.decode(tok.encode(text)) == text  # byte-level: the JSON round-trips
    ids, mask = encode_conversation(tok, conv["messages"], conv["tools"])
    assert ids == tok.encode(text)
    learnt = tok.decode([i for i, m in zip(ids, mask) if m])
    call = next(m for m in conv["messages"] if m.get("tool_calls"))["tool_calls"][0]["function"]
    assert f'<tool_call>{{"name": "{call["name"]}", "arguments": {call["arguments"]}}}</tool_call><EOS>' in learnt
    assert "<tool_response>" not in learnt and "# Tools" not in learnt
    assert text.startswith("<|system|>") and '{"name": "fetch", "description": "Fetch an item and bring it back."' in text
    r = rows.rows("train", 384)
    assert r["targets"] > 0 and r["x"].shape[1] == 384


def test_the_dataset_hook_builds_the_set(tmp_path):
    assert builtin_dataset("bark-agent") is not None


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            '<tool_call>{"name": "fetch", "arguments": {"item": "ball"}}</tool_call>',
            (None, [{"name": "fetch", "arguments": {"item": "ball"}}]),
        ),
        (
            'On it. <tool_call>{"name": "bark", "arguments": {"times": 2}}</tool_call><tool_call>{"name": "fetch", "arguments": {}}</tool_call>',
            ("On it.", [{"name": "bark", "arguments": {"times": 2}}, {"name": "fetch", "arguments": {}}]),
        ),
        ("  Woof!  ", ("Woof!", [])),
        ('<tool_call>{"name": "fetch", "arguments": {"item": "ball"}}', (None, None)),  # not closed
        ('<tool_call>{"name": "fetch", "arguments": {"item": </tool_call>', (None, None)),  # not JSON
        ('<tool_call>{"name": "fetch", "arguments": "{}"}</tool_call>', (None, None)),  # arguments not an object
    ],
)
def test_parse_agent_reply(text, expected):
    assert parse_agent_reply(text) == expected


def test_valid_agent_call_checks_name_keys_and_types():
    tools = list(AGENT_TOOLS)
    assert valid_agent_call({"name": "bark", "arguments": {"times": 3}}, tools)
    assert not valid_agent_call({"name": "bark", "arguments": {"times": "3"}}, tools)
    assert not valid_agent_call({"name": "bark", "arguments": {"times": True}}, tools)
    assert not valid_agent_call({"name": "fetch", "arguments": {}}, tools)  # a required key missing
    assert not valid_agent_call({"name": "fetch", "arguments": {"item": "ball", "now": 1}}, tools)
    assert not valid_agent_call({"name": "fly", "arguments": {}}, tools)
    assert not valid_agent_call({"name": "weather", "arguments": {"city": "Oslo"}}, tools[:2])  # not offered


def test_answers_use_the_tool_result():
    rng = random.Random(0)
    r = run_agent_tool("weather", {"city": "São Paulo"}, rng)
    assert all(
        "São Paulo" in a and str(json.loads(r)["temperature_c"]) in a for a in agent_answers("weather", {"city": "São Paulo"}, r)
    )
    assert agent_answers("bark", {"times": 2}, run_agent_tool("bark", {"times": 2}, rng))[0] == "Woof woof!"


def test_a_short_run_trains_and_the_eval_reports(tmp_path, rows):
    """A few steps on the set, then the eval over the checkpoint: its counts add up (the
    accuracy figure belongs to the preset's run, see test_the_preset_calls_the_right_tool)."""
    from barkgpt.config import build_configs
    from barkgpt.generate import load_generator
    from barkgpt.train import train

    overrides = {"out_dir": str(tmp_path / "run"), "max_iters": 6, "eval_interval": 6, "eval_iters": 1, "warmup_iters": 1}
    overrides.update(n_layer=1, n_embd=32, n_head=2, batch_size=4)
    model, cfg = build_configs("bark-agent", None, overrides)
    summary = train(model, cfg, quiet=True, source=rows)
    assert summary["val_loss"] < 7.5  # ln(vocab) at init is ~6.9; a few steps of AdamW do not blow up
    r = bark_agent_eval(load_generator(tmp_path / "run", device="cpu"), n=2, seed=0)
    assert (r["samples"], r["talk_samples"]) == (2, 1)
    assert 0 <= r["right"] <= r["valid"] <= 2 and r["right_share"] == r["right"] / 2
    assert len(r["failures"]) == 2 - r["right"]


@pytest.mark.slow
def test_the_preset_calls_the_right_tool(bark_agent_run):
    """The acceptance figure: the preset as `barkgpt train --preset bark-agent` runs it (the
    session's ``bark_agent_run``), then `barkgpt eval --bark-agent`: the right tool with the right
    arguments on >= 90% of 100 held-out requests (greedy, tool_choice auto semantics)."""
    from barkgpt.generate import load_generator

    r = bark_agent_eval(load_generator(bark_agent_run, device="cpu"), n=100, seed=0)
    assert r["right_share"] >= 0.9 and r["valid_share"] >= 0.9, r
