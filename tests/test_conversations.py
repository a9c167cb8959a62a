"""Chat data: reading both JSONL formats, group splits, rendering with the chat template, assistant
masks and packing."""

import json
import random

import numpy as np
import pytest

from barkgpt.common import BarkError
from barkgpt.conversations import (
    IGNORE_INDEX,
    encode_conversation,
    load_conversations,
    pack_conversations,
    pack_rows,
    split_conversations,
)
from barkgpt.tokenizer import CHAT_TOKENS, SPECIAL_TOKENS, Tokenizer

# A fixed word vocabulary with the word chat template ("User: ... Assistant: ... <EOS>").
WORDS = Tokenizer.from_words((*SPECIAL_TOKENS, "User:", "Assistant:", "hi", "yo", "go"))


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chat_tok(tiny_tokenizer):
    tok, added = tiny_tokenizer.with_chat_tokens()
    assert added == 3
    return tok


def test_reads_openai_and_sharegpt_rows(tmp_path):
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {
                "tree_id": "a",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."},
                ],
            },
            "",
            {"conversations": [{"from": "human", "value": "Hey"}, {"from": "gpt", "value": "Yo"}]},
        ],
    )
    convs = load_conversations(path)
    assert [m["role"] for m in convs[0]["messages"]] == ["system", "user", "assistant"]
    assert convs[1]["messages"] == [{"role": "user", "content": "Hey"}, {"role": "assistant", "content": "Yo"}]
    assert [c["group"] for c in convs] == ["a", "#3"]  # no tree_id: a group of its own


@pytest.mark.parametrize(
    "row, match",
    [
        ("{not json", "line 1 is not valid JSON"),
        ({"text": "hi"}, "neither a 'messages' list"),
        ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown role 'robot'"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}, "needs a string 'content'"),
        ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn"),
    ],
)
def test_bad_rows_are_one_line_errors(tmp_path, row, match):
    with pytest.raises(BarkError, match=match):
        load_conversations(write_jsonl(tmp_path / "bad.jsonl", [row]))


def test_split_keeps_each_tree_on_one_side(shared_data):
    convs = load_conversations(shared_data / "chat-sample.jsonl")
    train, val = split_conversations(convs, val_fraction=0.1, seed=1)
    assert len(train) + len(val) == len(convs) == 547
    train_trees, val_trees = {c["group"] for c in train}, {c["group"] for c in val}
    assert not train_trees & val_trees
    assert len(val_trees) == round(95 * 0.1)
    with pytest.raises(BarkError, match="too few to split"):
        split_conversations(convs[:1])


def test_real_conversations_render_and_mask_exactly_their_replies(shared_data, chat_tok, tiny_tokenizer):
    """What training really does with a conversation: render it, encode it, and learn exactly the
    assistant replies (each ending in <EOS>), for every row of the real sample."""
    rows = [json.loads(line)["messages"] for line in (shared_data / "chat-sample.jsonl").read_text().splitlines()]
    for messages in rows:
        ids, mask = encode_conversation(chat_tok, messages)
        replies = "".join(m["content"] + "<EOS>" for m in messages if m["role"] == "assistant")
        assert chat_tok.decode([i for i, m in zip(ids, mask) if m]) == replies
        assert chat_tok.decode(ids) == chat_tok.apply_chat_template(messages, add_generation_prompt=False)
    # a reply that looks like a turn boundary in the plain-text template is still all target
    plain = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "line one\nline two"},
        {"role": "assistant", "content": "Sure.\nUser: not a turn"},
    ]
    ids, mask = encode_conversation(tiny_tokenizer, plain)
    assert tiny_tokenizer.decode([i for i, m in zip(ids, mask) if m]).strip() == "Sure.\nUser: not a turn<EOS>"


def test_assistant_mask_covers_exactly_the_replies_and_their_eos(chat_tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Café? 🐶"},
        {"role": "assistant", "content": "Oui, café."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Woof! 東京"},
    ]
    ids, mask = encode_conversation(chat_tok, messages)
    assert ids == chat_tok.encode(chat_tok.apply_chat_template(messages, add_generation_prompt=False))
    targets = chat_tok.decode([i for i, m in zip(ids, mask) if m])
    assert targets == "Oui, café.<EOS>Woof! 東京<EOS>"
    prompt = chat_tok.decode([i for i, m in zip(ids, mask) if not m])
    assert prompt == "<|system|>Be brief.<EOS><|user|>Café? 🐶<EOS><|assistant|><|user|>Bye<EOS><|assistant|>"


TOOLS = [
    {
        "type": "function",
        "function": {"name": "fetch", "parameters": {"type": "object", "properties": {"item": {"type": "string"}}}},
    }
]
CALL = {"id": "call_1", "type": "function", "function": {"name": "fetch", "arguments": '{"item": "ball"}'}}
TOOL_ROW = {
    "tools": TOOLS,
    "messages": [
        {"role": "user", "content": "Get the ball"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "got ball"},
        {"role": "assistant", "content": "Here."},
    ],
}


def test_tool_calls_are_targets_and_tool_results_are_not(tmp_path, chat_tok):
    """OpenAI fine-tuning rows with tools: the reply's call text is learnt, the tool's result is context."""
    (conv,) = load_conversations(write_jsonl(tmp_path / "tools.jsonl", [TOOL_ROW]))
    assert conv["tools"] == TOOLS and conv["messages"] == TOOL_ROW["messages"]  # tool fields kept as given
    ids, mask = encode_conversation(chat_tok, conv["messages"], conv["tools"])
    assert chat_tok.decode(ids) == chat_tok.apply_chat_template(conv["messages"], add_generation_prompt=False, tools=TOOLS)
    targets = chat_tok.decode([i for i, m in zip(ids, mask) if m])
    assert targets == '<tool_call>{"name": "fetch", "arguments": {"item": "ball"}}</tool_call><EOS>Here.<EOS>'
    context = chat_tok.decode([i for i, m in zip(ids, mask) if not m])
    assert context.startswith("<|system|># Tools\n") and "<|user|><tool_response>got ball</tool_response><EOS>" in context
    rows = pack_conversations(chat_tok, [conv, conv["messages"]], block_size=256)  # with and without tools
    assert rows["targets"] == 2 * sum(mask)
    assert rows["tokens"] > 2 * rows["targets"]  # the tools section rendered into the first one
    bad = {"messages": [{"role": "assistant", "content": None}]}
    with pytest.raises(BarkError, match="needs a string 'content'"):
        load_conversations(write_jsonl(tmp_path / "bad.jsonl", [bad]))


def test_assistant_mask_with_word_and_char_templates():
    ids, mask = encode_conversation(WORDS, [{"role": "user", "content": "go"}, {"role": "assistant", "content": "yo yo hi"}])
    assert [WORDS.id_to_token(i) for i, m in zip(ids, mask) if m] == ["yo", "yo", "hi", "<EOS>"]
    char = Tokenizer.train("char", ["User: hi\nAssistant: yo\n"])
    ids, mask = encode_conversation(char, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert char.decode([i for i, m in zip(ids, mask) if m]) == " yo<EOS>"


def test_pack_rows_places_every_piece_once_within_the_row():
    rng = random.Random(0)
    lengths = [rng.randint(1, 64) for _ in range(300)]
    rows = pack_rows(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(300))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(rows) <= 1.1 * sum(lengths) / 64 + 1  # best-fit decreasing wastes little


def test_packing_keeps_every_target_and_separates_segments(chat_tok, shared_data):
    convs = [c["messages"] for c in load_conversations(shared_data / "chat-sample.jsonl")[:40]]
    rows = pack_conversations(chat_tok, convs, block_size=96)
    expected = 0
    for messages in convs:
        _, mask = encode_conversation(chat_tok, messages)
        expected += sum(mask[1:])  # the first token is never a target
    assert rows["targets"] == int((rows["y"] != IGNORE_INDEX).sum()) == expected
    x, y, seg = rows["x"], rows["y"], rows["segments"]
    assert x.shape == y.shape == seg.shape and x.shape[1] == 96
    assert (np.diff(seg, axis=1) >= 0).all() and (np.diff(seg, axis=1) <= 1).all()  # contiguous runs
    # a target is the next input of the same segment (the last token of a piece has no next input)
    same = seg[:, 1:] == seg[:, :-1]
    inner = (y[:, :-1] != IGNORE_INDEX) & same
    assert (y[:, :-1][inner] == x[:, 1:][inner]).all()
    assert rows["tokens"] / x.size > 0.9


def test_with_chat_tokens_appends_ids_and_is_idempotent(tiny_tokenizer, chat_tok, tmp_path):
    assert [chat_tok.token_to_id(t) for t in CHAT_TOKENS] == [300, 301, 302]
    assert chat_tok.encode("hello world") == tiny_tokenizer.encode("hello world")
    assert chat_tok.encode("<|user|>") == [301]
    chat_tok.save(tmp_path)
    again, added = Tokenizer.load(tmp_path).with_chat_tokens()
    assert added == 0 and again.vocab_size == 303 and again.chat_template == chat_tok.chat_template
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["additional_special_tokens"] == list(CHAT_TOKENS)
