"""Tests for barkgpt.tokenizer: round trips, special tokens, fixed word vocabularies, save/load,
streaming decode and chat templates. Tokenizers are trained in-process on a few KB of text."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from barkgpt.common import BarkError
from barkgpt.tokenizer import SPECIAL_TOKENS, WORD_CHAT_TEMPLATE, Tokenizer

CORPUS = (
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.\n"
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "Ünïcödé wörds, naïve café, 東京は日本の首都です。 Привет, мир! 😀🐶 woof!\n"
    "    indented line\twith\ttabs\r\nand a Windows line ending.\n"
) * 20  # about 6 KB

# A fixed word vocabulary (Tokenizer.from_words): ids are positions, the specials anywhere.
FIXED = ("<PAD>", "<EOS>", "a", "b", "User:", "Assistant:", "hello", "<BOS>", "<UNK>")

# Text rich in multi-byte characters, for round trips and streaming.
UNICODE_TEXT = st.text(st.characters(codec="utf-8"), max_size=60) | st.text(
    st.sampled_from(list("ab \n\t😀🐶東京é̈€𝄞")), max_size=40
)


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.train("bpe", [CORPUS], 300)


@pytest.fixture(scope="module")
def char():
    return Tokenizer.train("char", iter(CORPUS.splitlines(keepends=True)))


@pytest.fixture(scope="module")
def word():
    return Tokenizer.train("word", ["a a a b b c d", "e e e e"])


def stream(tok, ids, skip_special_tokens=False):
    """All pieces the incremental decoder emits for ids, flush included."""
    dec = tok.decoder(skip_special_tokens)
    return [dec.add(i) for i in ids] + [dec.flush()]


# ---- bpe ------------------------------------------------------------------------------------


def test_bpe_vocab_and_special_ids(bpe):
    assert bpe.kind == "bpe"
    assert bpe.vocab_size == 300
    assert [bpe.pad_id, bpe.eos_id, bpe.bos_id, bpe.unk_id] == [0, 1, 2, 3]
    assert [bpe.id_to_token(i) for i in range(4)] == list(SPECIAL_TOKENS)


@settings(max_examples=200, deadline=None)
@given(UNICODE_TEXT)
def test_bpe_round_trips_any_unicode(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert bpe.unk_id not in ids or "<UNK>" in text  # bytes cover everything


def test_bpe_vocab_size_below_minimum_raises():
    with pytest.raises(BarkError, match="minimum is 260"):
        Tokenizer.train("bpe", ["hello"], 259)
    with pytest.raises(BarkError, match="--vocab-size"):
        Tokenizer.train("bpe", ["hello"])
    with pytest.raises(BarkError, match="minimum is 5"):
        Tokenizer.train("char", ["hello"], 4)
    with pytest.raises(BarkError, match="unknown tokenizer kind"):
        Tokenizer.train("wordpiece", ["hello"], 300)


def test_bpe_encode_batch_equals_encode(bpe):
    texts = ["hello world", "", "東京 😀", CORPUS[:500]]
    assert bpe.encode_batch(texts) == [bpe.encode(t) for t in texts]


def test_decode_skips_special_tokens_and_out_of_range_ids(bpe):
    ids = [bpe.bos_id] + bpe.encode("fox") + [bpe.eos_id, 10**6, -1]
    assert bpe.decode(ids) == "<BOS>fox<EOS>"
    assert bpe.decode(ids, skip_special_tokens=True) == "fox"


# ---- special tokens -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bpe", "char", "word", "fixed"])
def test_special_tokens_in_text_encode_to_their_ids(kind, bpe, char, word):
    tok = {"bpe": bpe, "char": char, "word": word, "fixed": Tokenizer.from_words(FIXED)}[kind]
    for name, i in zip(SPECIAL_TOKENS, (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id), strict=True):
        assert tok.encode(name) == [i]
        assert tok.token_to_id(name) == i
    ids = tok.encode("a <EOS> a")
    assert ids.count(tok.eos_id) == 1


# ---- char -----------------------------------------------------------------------------------


def test_char_round_trip_is_exact_for_seen_characters(char):
    text = "  The dog\tsleeps.\n\n東京 😀\r\nwoof!  "
    ids = char.encode(text)
    assert len(ids) == len(text)  # one token per character
    assert char.unk_id not in ids
    assert char.decode(ids) == text


def test_char_unseen_characters_map_to_unk(char):
    ids = char.encode("dog§¶")
    assert ids[-2:] == [char.unk_id, char.unk_id]
    assert char.count_unknown("dog§¶ <UNK>") == 2  # the literal special token is not unknown


def test_char_vocab_cap_keeps_most_frequent():
    tok = Tokenizer.train("char", ["aaabbc"], 6)
    assert tok.vocab_size == 6
    assert tok.encode("abc") == [4, 5, tok.unk_id]


# ---- word -----------------------------------------------------------------------------------


def test_word_unknown_words_map_to_unk_and_decode_joins_with_spaces(word):
    ids = word.encode("a  b\n\tzebra")
    assert ids == [word.token_to_id("a"), word.token_to_id("b"), word.unk_id]
    assert word.decode(ids) == "a b <UNK>"
    assert word.count_unknown("a zebra yak b") == 2


def test_word_vocab_cap_keeps_most_frequent_ties_by_text():
    tok = Tokenizer.train("word", ["b a c d b a e e"], 7)
    assert [tok.id_to_token(i) for i in range(4, 7)] == ["a", "b", "e"]  # count 2 each; c, d dropped
    assert tok.encode("c") == [tok.unk_id]


def test_word_and_char_with_no_text_raise():
    with pytest.raises(BarkError, match="no text"):
        Tokenizer.train("word", ["  \n "])


# ---- fixed word vocabularies ----------------------------------------------------------------


def test_from_words_ids_are_positions():
    tok = Tokenizer.from_words(FIXED)
    assert tok.kind == "word" and tok.vocab_size == len(FIXED)
    assert [tok.id_to_token(i) for i in range(len(FIXED))] == list(FIXED)
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 7, 8)
    assert tok.encode("User: hello Assistant: a b <EOS>") == [4, 6, 5, 2, 3, 1]
    assert tok.encode("zebra") == [8] and tok.count_unknown("zebra a") == 1
    assert tok.id_to_token(len(FIXED)) is None
    assert tok.chat_template == WORD_CHAT_TEMPLATE
    assert Tokenizer.from_words(FIXED, chat_template="{{ 'x' }}").apply_chat_template([]) == "x"


@pytest.mark.parametrize(
    "vocab, problem",
    [
        (("<PAD>", "<EOS>", "<BOS>", "a"), "lacks the special token"),
        ((*SPECIAL_TOKENS, "a", "a"), "repeats 'a'"),
        ((*SPECIAL_TOKENS, "a b"), "without whitespace"),
        ((*SPECIAL_TOKENS, ""), "without whitespace"),
    ],
)
def test_from_words_rejects_a_bad_vocabulary(vocab, problem):
    with pytest.raises(BarkError, match=problem):
        Tokenizer.from_words(vocab)


def test_word_chat_template():
    tok = Tokenizer.from_words(FIXED)
    assert tok.apply_chat_template([{"role": "user", "content": "hello"}]) == "User: hello Assistant:"
    convo = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "a b"},
        {"role": "user", "content": "hello"},
    ]
    text = tok.apply_chat_template(convo)
    assert text == "User: hello Assistant: a b <EOS> User: hello Assistant:"  # system skipped
    assert tok.apply_chat_template(convo[:3], add_generation_prompt=False) == "User: hello Assistant: a b <EOS> "
    assert tok.unk_id not in tok.encode(text)


def test_generic_chat_template(bpe):
    convo = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    assert bpe.apply_chat_template(convo) == "System: Be brief.\nUser: Hi\nAssistant: Hello.<EOS>\nUser: Bye\nAssistant:"
    assert bpe.apply_chat_template(convo[:1], add_generation_prompt=False) == "System: Be brief.\n"


def test_chat_template_rejects_bad_messages(bpe):
    with pytest.raises(BarkError, match="unknown chat role robot; use system, user, assistant or tool"):
        bpe.apply_chat_template([{"role": "robot", "content": "x"}])
    with pytest.raises(BarkError, match="message 0"):
        bpe.apply_chat_template([{"role": "user"}])
    with pytest.raises(BarkError, match="message 0"):  # content None only beside tool_calls
        bpe.apply_chat_template([{"role": "assistant", "content": None}])
    with pytest.raises(BarkError, match="message 1: each tool call needs a 'function'"):
        bpe.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}]
        )
    with pytest.raises(BarkError, match="tools must be a list"):
        bpe.apply_chat_template([{"role": "user", "content": "x"}], tools="fetch")


# ---- tool calls (the contract the server parses replies by) ----------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "fetch",
            "description": "Fetch an item — fast <now>",  # non-ASCII and HTML characters stay as they are
            "parameters": {"type": "object", "properties": {"item": {"type": "string"}}, "required": ["item"]},
        },
    },
    {
        "type": "function",
        "function": {"name": "bark", "parameters": {"type": "object", "properties": {"times": {"type": "integer"}}}},
    },
]
FETCH_JSON = (
    '{"name": "fetch", "description": "Fetch an item — fast <now>", "parameters": {"type": "object", '
    '"properties": {"item": {"type": "string"}}, "required": ["item"]}}'
)
BARK_JSON = '{"name": "bark", "parameters": {"type": "object", "properties": {"times": {"type": "integer"}}}}'
TOOL_HEADER = f'# Tools\n{FETCH_JSON}\n{BARK_JSON}\nCall a tool as <tool_call>{{"name": NAME, "arguments": {{...}}}}</tool_call>'
TOOL_TALK = [
    {"role": "user", "content": "Get the ball and bark twice"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "fetch", "arguments": '{"item": "ball"}'}},
            # arguments as a mapping, as HF callers pass them
            {"id": "call_2", "type": "function", "function": {"name": "bark", "arguments": {"times": 2}}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "name": "fetch", "content": "got the ball"},
    {"role": "assistant", "content": "Here it is."},
]
CALLS = '<tool_call>{"name": "fetch", "arguments": {"item": "ball"}}</tool_call><tool_call>{"name": "bark", "arguments": {"times": 2}}</tool_call>'


def test_plain_template_renders_tools_calls_and_results(bpe):
    assert bpe.apply_chat_template(TOOL_TALK, tools=TOOLS) == (
        f"System: {TOOL_HEADER}\nUser: Get the ball and bark twice\nAssistant: {CALLS}<EOS>\n"
        "User: <tool_response>got the ball</tool_response>\nAssistant: Here it is.<EOS>\nAssistant:"
    )
    system = [{"role": "system", "content": "You are a dog."}]  # the system text, a blank line, the tools
    assert bpe.apply_chat_template(system + TOOL_TALK[:1], tools=TOOLS) == (
        f"System: You are a dog.\n\n{TOOL_HEADER}\nUser: Get the ball and bark twice\nAssistant:"
    )
    # no tools (None or []): exactly as before; calls and results still render
    convo = system + [{"role": "user", "content": "Hi"}]
    assert (
        bpe.apply_chat_template(convo, tools=[])
        == bpe.apply_chat_template(convo)
        == "System: You are a dog.\nUser: Hi\nAssistant:"
    )
    assert bpe.apply_chat_template(TOOL_TALK[:3], add_generation_prompt=False).endswith(
        f"Assistant: {CALLS}<EOS>\nUser: <tool_response>got the ball</tool_response>\n"
    )


def test_chat_tokens_template_renders_tools_calls_and_results(bpe):
    chat, _ = bpe.with_chat_tokens()
    system = [{"role": "system", "content": "You are a dog."}]
    assert chat.apply_chat_template(system + TOOL_TALK, tools=TOOLS) == (
        f"<|system|>You are a dog.\n\n{TOOL_HEADER}<EOS><|user|>Get the ball and bark twice<EOS><|assistant|>{CALLS}<EOS>"
        "<|user|><tool_response>got the ball</tool_response><EOS><|assistant|>Here it is.<EOS><|assistant|>"
    )
    assert chat.apply_chat_template([], tools=TOOLS[:1], add_generation_prompt=False) == (
        "<|system|># Tools\n" + FETCH_JSON + '\nCall a tool as <tool_call>{"name": NAME, "arguments": {...}}</tool_call><EOS>'
    )
    # the role tokens and the tool-call text encode as the model writes them
    text = chat.apply_chat_template(TOOL_TALK[:2], add_generation_prompt=False)
    assert chat.decode(chat.encode(text)) == text


def test_old_templates_ignore_tools():
    old = Tokenizer.from_words(FIXED)  # the word template (and any saved template) takes no tools
    assert old.apply_chat_template([{"role": "user", "content": "hello"}], tools=TOOLS) == "User: hello Assistant:"


# ---- save / load ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bpe", "char", "word", "fixed"])
def test_save_load_gives_identical_encodings_and_config(kind, bpe, char, word, tmp_path):
    tok = {"bpe": bpe, "char": char, "word": word, "fixed": Tokenizer.from_words(FIXED)}[kind]
    tok.model_max_length = 128
    try:
        tok.save(tmp_path)
    finally:
        tok.model_max_length = None
    back = Tokenizer.load(tmp_path)
    assert (back.kind, back.vocab_size, back.chat_template) == (tok.kind, tok.vocab_size, tok.chat_template)
    assert (back.pad_id, back.eos_id, back.bos_id, back.unk_id) == (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id)
    assert back.model_max_length == 128
    for text in [CORPUS[:300], "User: speak Assistant: woof <EOS>", "zebra 😀 §"]:
        assert back.encode(text) == tok.encode(text)
        assert back.decode(back.encode(text)) == tok.decode(tok.encode(text))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["add_bos_token"] is False
    assert (config["bos_token"], config["eos_token"], config["pad_token"], config["unk_token"]) == (
        "<BOS>",
        "<EOS>",
        "<PAD>",
        "<UNK>",
    )
    # Without tokenizer_config.json the kind is inferred from tokenizer.json.
    (tmp_path / "tokenizer_config.json").unlink()
    assert Tokenizer.load(tmp_path / "tokenizer.json").kind == tok.kind


def test_load_missing_or_corrupt_raises(tmp_path):
    with pytest.raises(BarkError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(BarkError, match="corrupt"):
        Tokenizer.load(tmp_path)
    Tokenizer.from_words(FIXED).save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(BarkError, match="not valid JSON"):
        Tokenizer.load(tmp_path)


# ---- streaming decode -----------------------------------------------------------------------


def test_streaming_holds_back_partial_characters(bpe):
    ids = bpe.encode("😀")
    assert len(ids) > 1  # the small vocabulary has no token for it: several byte tokens
    assert stream(bpe, ids) == [""] * (len(ids) - 1) + ["😀", ""]
    assert stream(bpe, ids[:-1])[-1] == "\ufffd"  # an incomplete character at flush


def test_id_to_bytes_gives_each_tokens_raw_bytes(bpe, char, word):
    """OpenAI's logprob ``bytes``: a byte token of a multi-byte character is that byte, not U+FFFD."""
    ids = bpe.encode("😀 café")
    assert b"".join(bpe.id_to_bytes(i) for i in ids) == "😀 café".encode()
    first = bpe.id_to_bytes(ids[0])  # part of the emoji's 4 bytes
    assert bpe.decode(ids[:1]) == "\ufffd" and 0 < len(first) < 4 and "😀".encode().startswith(first)
    assert bpe.id_to_bytes(bpe.eos_id) == b"<EOS>" and bpe.id_to_bytes(10**6) == b""
    assert char.id_to_bytes(char.encode("é")[0]) == "é".encode()
    assert [word.id_to_bytes(i) for i in word.encode("a e")] == [b"a", b"e"]


@settings(max_examples=200, deadline=None)
@given(UNICODE_TEXT)
def test_streaming_decode_never_emits_half_a_character(bpe, text):
    ids = bpe.encode(text)
    pieces = stream(bpe, ids)
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in text
    assert "".join(pieces) == bpe.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 299), max_size=30), st.booleans())
def test_streaming_decode_equals_decode_for_any_ids(bpe, ids, skip):
    assert "".join(stream(bpe, ids, skip)) == bpe.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("kind", ["char", "word", "fixed"])
def test_streaming_decode_char_and_word(kind, char, word):
    tok = {"char": char, "word": word, "fixed": Tokenizer.from_words(FIXED)}[kind]
    ids = tok.encode("a b <EOS> zebra c\n") + [tok.bos_id, 10**6]
    for skip in (False, True):
        assert "".join(stream(tok, ids, skip)) == tok.decode(ids, skip_special_tokens=skip)
