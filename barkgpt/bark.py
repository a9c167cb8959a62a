"""The Bark toy: BarkGPT's "hello world", at the edge of the package.

Everything that knows about barks lives here and nowhere else: the two fixed word vocabularies,
the generated corpora behind ``--data bark`` and ``--data bark-chat`` (and the presets of the same
names), and the rule checker of ``barkgpt eval --bark``. It is an edge, not a layer (STYLE.md
section 3): it imports the core it needs (``tokenizer``, ``data``, ``conversations``) and no core
module imports it.

- ``bark``: documents ``User: speak Assistant: <1 to 10 barks> <EOS>`` over an 11-token
  vocabulary, written as a prepared data folder (:func:`prepare_bark`).
- ``bark-chat``: multi-turn conversations in which the user's command picks the bark (speak ->
  woof/arf, growl -> grrr, sit -> one arf, play -> many ruffs, anything else -> ``ruff?``), as a
  chat batch source (:func:`bark_chat_rows`), and the rule the replies follow
  (:func:`follows_bark_rule`, scored over a model by :func:`bark_eval`).
- ``bark-agent``: conversations in which the user asks the dog to fetch an item, bark a number
  of times or check a city's weather, and the assistant calls the tool (OpenAI ``tools`` and
  ``tool_calls``), reads its made-up result and answers in words, or just talks; over a
  byte-level BPE so it writes JSON (:func:`bark_agent_rows`), scored by :func:`bark_agent_eval`.

The hook: importing this module registers both names with
:func:`barkgpt.data.register_dataset`, the one table of built-in generated datasets that
``train.open_source`` (and the server's run form) consult. The ``barkgpt`` CLI imports it before
``train``, ``eval`` and ``serve``; Python code that trains on these names in-process does
``import barkgpt.bark`` first, as it would import any plugin::

    import barkgpt.bark  # registers "bark" and "bark-chat"
    from barkgpt.config import build_configs
    from barkgpt.train import train
    train(*build_configs("bark"))
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

from barkgpt.common import BarkError
from barkgpt.conversations import ChatRows
from barkgpt.data import prepare_documents, register_dataset
from barkgpt.preferences import PreferencePairs
from barkgpt.tokenizer import (
    BOS,
    BPE_MIN_VOCAB,
    CHAT_TOKENS,
    EOS,
    PAD,
    SPECIAL_TOKENS,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    UNK,
    Tokenizer,
)

# The `bark` corpus' vocabulary; ids are positions (kept from the first release, so old
# checkpoints still decode).
BARK_VOCAB = (PAD, EOS, "woof", "arf", "ruff", "grrr", "User:", "Assistant:", "speak", BOS, UNK)
BARKS = ("woof", "arf", "ruff", "grrr")
# Bark chat (the bark-chat preset): the user's one-word command picks the style of bark; any
# other message gets "ruff?". Words outside this vocabulary map to <UNK>.
BARK_COMMANDS = ("speak", "growl", "sit", "play")
BARK_OTHER_WORDS = (
    "fetch",
    "stay",
    "roll",
    "down",
    "come",
    "paw",
    "heel",
    "shake",
    "hello",
    "treat",
    "walk",
    "bath",
    "good",
    "dog",
    "please",
    "now",
)
CONFUSED = "ruff?"  # the reply to anything that is not exactly one of the commands
BARK_CHAT_VOCAB = (*SPECIAL_TOKENS, "User:", "Assistant:", *BARKS, CONFUSED, *BARK_COMMANDS, *BARK_OTHER_WORDS)
# The rule: command -> the barks a reply may use, and how many (inclusive).
# A command is the whole message: "sit down" or "Speak" is "any other message".
BARK_STYLES = {"speak": ("woof", "arf"), "growl": ("grrr",), "sit": ("arf",), "play": ("ruff",)}
BARK_COUNTS = {"speak": (1, 6), "growl": (1, 4), "sit": (1, 1), "play": (3, 8)}
BARK_DOCS = 20000  # documents in the `bark` corpus
BARK_SEED = 1337  # the `bark` corpus is the same for every run (TrainConfig.seed does not change it)
BARK_CHAT_CONVERSATIONS = 10000  # conversations in the `bark-chat` set


# ---- vocabularies ---------------------------------------------------------------------------


def bark_tokenizer() -> Tokenizer:
    """The fixed Bark vocabulary (word kind, vocab_size 11), with the word chat template.

    Ids: 0 ``<PAD>``, 1 ``<EOS>``, 2 ``woof``, 3 ``arf``, 4 ``ruff``, 5 ``grrr``, 6 ``User:``,
    7 ``Assistant:``, 8 ``speak``, 9 ``<BOS>``, 10 ``<UNK>``. Chat template: ``User: {c} ``,
    ``Assistant: {c} <EOS> ``, generation prompt ``Assistant:``.
    """
    return Tokenizer.from_words(BARK_VOCAB)


def bark_chat_tokenizer() -> Tokenizer:
    """The fixed Bark chat vocabulary (word kind, ``BARK_CHAT_VOCAB``, 31 tokens): the specials
    (ids 0..3), ``User:``, ``Assistant:``, the barks, ``ruff?``, the four commands and a few other
    words, with the word chat template. Any other word encodes to ``<UNK>``."""
    return Tokenizer.from_words(BARK_CHAT_VOCAB)


# ---- the `bark` corpus ----------------------------------------------------------------------


def bark_documents(n_docs: int, seed: int) -> Iterator[str]:
    """Yield ``n_docs`` Bark documents such as ``"User: speak Assistant: woof arf <EOS>"``.

    Each has 1 to 10 barks drawn uniformly from ``woof arf ruff grrr``. Only ``random.random()``
    is used, whose sequence for a given seed Python guarantees across versions, so the
    documents are the same everywhere for the same ``seed``.
    """
    rng = random.Random(seed)
    for _ in range(n_docs):
        n = 1 + int(rng.random() * 10)
        barks = " ".join(BARKS[int(rng.random() * len(BARKS))] for _ in range(n))
        yield f"User: speak Assistant: {barks} <EOS>"


def prepare_bark(out: str | Path, n_docs: int = BARK_DOCS, val_fraction: float = 0.1, seed: int = BARK_SEED) -> dict:
    """Write the Bark toy dataset (:func:`bark_documents`) with :func:`bark_tokenizer` into ``out``.

    The last ``round(n_docs * val_fraction)`` documents (at least 1) form the validation split.
    The documents already end in ``<EOS>``, so no extra EOS is added. ``source_sha256`` hashes
    the documents, each followed by a newline (see :func:`barkgpt.data.prepare_documents`).

    Returns:
        The meta dict, as ``data.prepare_dataset`` (``source`` is ``"bark"``).

    Raises:
        BarkError: ``val_fraction`` outside (0, 0.5] or fewer than 2 documents.
    """
    if n_docs < 2:
        raise BarkError(f"n_docs {n_docs} is too few to split into train and val; use at least 2")
    return prepare_documents(
        list(bark_documents(n_docs, seed)), out, bark_tokenizer(), "bark", val_fraction=val_fraction, add_eos=False
    )


def build_bark(out: Path, seed: int) -> Path:
    """The ``bark`` builder of the dataset hook: prepare the corpus into ``out`` (a run's
    ``out_dir/data``) unless a prepared folder is already there (a resumed run), and return ``out``.
    ``seed`` is ignored: the corpus is fixed (``BARK_SEED``), so every run trains on the same
    documents."""
    if not (out / "meta.json").is_file():
        prepare_bark(out)
    return out


# ---- the `bark-chat` set and its rule -------------------------------------------------------


def bark_reply(command: str, rng: random.Random) -> str:
    """A reply that follows the Bark chat rule for ``command`` (random within the rule)."""
    if command not in BARK_STYLES:
        return CONFUSED
    lo, hi = BARK_COUNTS[command]
    return " ".join(rng.choice(BARK_STYLES[command]) for _ in range(rng.randint(lo, hi)))


def follows_bark_rule(command: str, reply: str) -> bool:
    """Whether ``reply`` is an allowed answer to ``command`` under the Bark chat rule.

    The reply's words must all be the command's barks, as many as the rule allows (speak 1-6 of
    woof/arf, growl 1-4 grrr, sit exactly one arf, play 3-8 ruff); any message that is not exactly
    one of the four commands must get exactly ``ruff?``. The long growl that the ``bark-dpo``
    preset teaches (``LONG_GROWL``, five grrr) is a rule-following answer to growl too.
    """
    words = reply.split()
    if command == "growl" and words == LONG_GROWL.split():
        return True
    if command not in BARK_STYLES:
        return words == [CONFUSED]
    lo, hi = BARK_COUNTS[command]
    return lo <= len(words) <= hi and all(w in BARK_STYLES[command] for w in words)


def sample_bark_command(rng: random.Random) -> str:
    """A user message: 60% one of the four commands, else another word in the vocabulary, a
    made-up word (which encodes to ``<UNK>``), or 2 to 3 words that may include commands."""
    u = rng.random()
    if u < 0.6:
        return rng.choice(BARK_COMMANDS)
    if u < 0.75:
        return rng.choice(BARK_OTHER_WORDS)
    if u < 0.85:
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7)))
    return " ".join(rng.choice(BARK_COMMANDS + BARK_OTHER_WORDS) for _ in range(rng.randint(2, 3)))


def bark_chat_conversations(n: int, seed: int, max_turns: int = 4) -> list[list[dict]]:
    """``n`` Bark chat conversations of 1 to ``max_turns`` user/assistant exchanges each.

    Deterministic for a given ``seed`` (``random.Random``). Every reply follows the rule of
    :func:`follows_bark_rule` for its own turn's command; earlier turns do not matter.

    Returns:
        ``[[{"role": "user", "content": "speak"}, {"role": "assistant", "content": "woof arf"}, ...], ...]``.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        messages = []
        for _ in range(rng.randint(1, max_turns)):
            command = sample_bark_command(rng)
            messages += [{"role": "user", "content": command}, {"role": "assistant", "content": bark_reply(command, rng)}]
        out.append(messages)
    return out


def bark_chat_rows(n_conversations: int = BARK_CHAT_CONVERSATIONS, val_fraction: float = 0.1, seed: int = 1337) -> ChatRows:
    """The ``bark-chat`` preset's data: generated conversations with :func:`bark_chat_tokenizer`.

    The last ``val_fraction`` of the conversations (at least one) are the val split.

    Nothing is checked here: when the val split takes every conversation (always so with fewer
    than 2) the train split is empty, and the returned ``ChatRows`` raises ``BarkError`` (no
    assistant tokens) when that split is first packed (``check``, ``rows``, ``batch``).
    """
    convs = bark_chat_conversations(n_conversations, seed)
    n_val = max(1, round(n_conversations * val_fraction))
    meta = {"source": "bark-chat", "source_sha256": hashlib.sha256(json.dumps(convs).encode()).hexdigest()}
    return ChatRows(bark_chat_tokenizer(), {"train": convs[:-n_val], "val": convs[-n_val:]}, meta)


def build_bark_chat(out: Path, seed: int) -> ChatRows:
    """The ``bark-chat`` builder of the dataset hook: :func:`bark_chat_rows` generated from the
    run's ``seed`` (nothing is written to ``out``)."""
    return bark_chat_rows(seed=seed)


def bark_eval(gen, n: int = 100, seed: int = 0, temperature: float = 1.0) -> dict:
    """The share of sampled replies that follow the Bark chat rule (:func:`follows_bark_rule`).

    Each of the ``n`` cases is a conversation of 0 to 2 earlier exchanges (correct ones, from the
    training generator) and a command drawn as the training data draws them; the model's reply is
    sampled at ``temperature`` with the given seed and must follow the rule for the last command
    and end with ``<EOS>`` within 16 tokens.

    Args:
        gen: a ``generate.TextGenerator`` (only its ``chat_prompt`` and ``complete`` are used,
            so this edge module needs no torch import of its own).

    Returns:
        ``{"samples": n, "passed": int, "share": float, "failures": [{"command", "reply", "finish_reason"}, ...],
        "by_command": {"speak": [passed, samples], ..., "other": [passed, samples]}}``.

    Raises:
        BarkError: ``n`` < 1.
    """
    if n < 1:
        raise BarkError(f"the number of samples must be at least 1, got {n}")
    rng = random.Random(seed)
    history_pool = bark_chat_conversations(n, seed + 1, max_turns=2)
    passed, failures = 0, []
    by_command = {c: [0, 0] for c in (*BARK_COMMANDS, "other")}
    for i in range(n):
        history = history_pool[i][: 2 * rng.randint(0, len(history_pool[i]) // 2)]
        command = sample_bark_command(rng)
        prompt = gen.chat_prompt([*history, {"role": "user", "content": command}])
        reply = gen.complete(prompt, truncate=True, max_new_tokens=16, temperature=temperature, seed=seed + i)[0]
        ok = reply.finish_reason == "stop" and follows_bark_rule(command, reply.text)
        counts = by_command[command if command in BARK_STYLES else "other"]
        counts[0], counts[1] = counts[0] + ok, counts[1] + 1
        if ok:
            passed += 1
        else:
            failures.append({"command": command, "reply": reply.text.strip(), "finish_reason": reply.finish_reason})
    return {"samples": n, "passed": passed, "share": passed / n, "failures": failures, "by_command": by_command}


# ---- the `bark-dpo` pairs: a new behaviour, preferred ------------------------------------------

LONG_GROWL = "grrr grrr grrr grrr grrr"  # bark-dpo's preferred answer to growl; bark-chat never gives it (1-4 grrr)
BARK_DPO_PAIRS = 2000  # generated preference pairs of the `bark-dpo` set


def off_rule_reply(command: str, rng: random.Random) -> str:
    """A reply that breaks the Bark chat rule for ``command``, as a rejected completion: half
    the time another command's reply (or ``ruff?``), half a near miss (a right reply with one
    more word, so the model learns where to stop)."""
    while True:
        if rng.random() < 0.5:
            reply = bark_reply(rng.choice([*BARK_COMMANDS, "other"]), rng)
        else:
            reply = f"{bark_reply(command, rng)} {rng.choice([*BARKS, CONFUSED])}"
        if not follows_bark_rule(command, reply):
            return reply


def bark_dpo_pairs(n: int, seed: int) -> list[dict]:
    """``n`` generated preference pairs: half teach the long growl, half keep the rule.

    Each prompt is 0 to 2 earlier exchanges (as ``bark-chat``'s) and a user message. Half the
    pairs ask ``growl`` and prefer ``LONG_GROWL`` over a bark-chat growl (1 to 4 grrr); the other
    half ask a message drawn as bark-chat draws them and prefer a rule-following reply over one
    that breaks the rule, so the other commands keep their rule while the growl changes.

    Returns:
        Pairs ``{"prompt": [messages], "chosen": [message], "rejected": [message], "group"}``.
    """
    rng = random.Random(seed)
    histories = bark_chat_conversations(n, seed + 1, max_turns=2)
    pairs = []
    for i in range(n):
        history = histories[i][: 2 * rng.randint(0, len(histories[i]) // 2)]
        if i % 2 == 0:
            # rejected: a bark-chat growl (1 to 4 grrr), one too long (6 grrr), or five and a word
            # more, so the model learns to stop right after the fifth grrr
            n_grrr = rng.choice([1, 2, 3, 4, 6, 5])
            rejected = " ".join(["grrr"] * n_grrr) + (f" {rng.choice([*BARKS, CONFUSED])}" if n_grrr == 5 else "")
            command, chosen = "growl", LONG_GROWL
        else:
            command = sample_bark_command(rng)
            chosen, rejected = bark_reply(command, rng), off_rule_reply(command, rng)
        pairs.append(
            {
                "prompt": [*history, {"role": "user", "content": command}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "group": f"#{i}",
            }
        )
    return pairs


def build_bark_dpo(out: Path, seed: int) -> PreferencePairs:
    """The ``bark-dpo`` builder of the dataset hook: :func:`bark_dpo_pairs` from the run's
    ``seed`` (last 10% the val split) over the bark-chat vocabulary, tuning a ``bark-chat``
    model (the preset flow trains one first when none is given)."""
    pairs = bark_dpo_pairs(BARK_DPO_PAIRS, seed)
    n_val = BARK_DPO_PAIRS // 10
    meta = {"source": "bark-dpo", "source_sha256": hashlib.sha256(json.dumps(pairs).encode()).hexdigest()}
    return PreferencePairs(bark_chat_tokenizer(), {"train": pairs[:-n_val], "val": pairs[-n_val:]}, meta, base_preset="bark-chat")


def long_growl_share(gen, n: int = 100, seed: int = 0, temperature: float = 1.0) -> dict:
    """The share of ``n`` sampled replies to ``growl`` (after 0 to 2 earlier exchanges, as in
    :func:`bark_eval`) that are exactly ``LONG_GROWL``: the behaviour ``bark-dpo`` prefers.

    Returns:
        ``{"samples": n, "long_growl": int, "share": float}``.

    Raises:
        BarkError: ``n`` < 1.
    """
    if n < 1:
        raise BarkError(f"the number of samples must be at least 1, got {n}")
    rng = random.Random(seed)
    histories = bark_chat_conversations(n, seed + 2, max_turns=2)
    hits = 0
    for i in range(n):
        history = histories[i][: 2 * rng.randint(0, len(histories[i]) // 2)]
        prompt = gen.chat_prompt([*history, {"role": "user", "content": "growl"}])
        reply = gen.complete(prompt, truncate=True, max_new_tokens=16, temperature=temperature, seed=seed + i)[0]
        hits += reply.finish_reason == "stop" and reply.text.split() == LONG_GROWL.split()
    return {"samples": n, "long_growl": hits, "share": hits / n}


# ---- the `bark-agent` set: tool calls ----------------------------------------------------------

# The dog's tools as OpenAI tool objects, exactly as LangChain's convert_to_openai_tool writes them
# for `def fetch(item: str)` and the others with these docstrings, so an agent built on such
# Python functions sends the tools the model was trained on.
AGENT_TOOLS = (
    {
        "type": "function",
        "function": {
            "name": "fetch",
            "description": "Fetch an item and bring it back.",
            "parameters": {"properties": {"item": {"type": "string"}}, "required": ["item"], "type": "object"},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "bark",
            "description": "Bark a number of times.",
            "parameters": {"properties": {"times": {"type": "integer"}}, "required": ["times"], "type": "object"},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "weather",
            "description": "Get the weather in a city.",
            "parameters": {"properties": {"city": {"type": "string"}}, "required": ["city"], "type": "object"},
        },
    },
)
AGENT_ITEMS = (
    "ball", "stick", "bone", "frisbee", "slipper", "sock", "shoe", "newspaper", "leash", "toy", "keys",
    "remote", "hat", "glove", "towel", "blanket", "pillow", "cup", "book", "phone", "wallet", "umbrella",
    "rope", "duck", "carrot", "bottle", "brush", "scarf", "tennis ball", "squeaky toy", "red ball", "car keys",
)  # fmt: skip
AGENT_CITIES = (
    "Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Oslo", "Lima", "Cairo", "Sydney", "Toronto",
    "Chicago", "Boston", "Dublin", "Vienna", "Prague", "Lisbon", "Athens", "Seoul", "Delhi", "Mumbai",
    "Nairobi", "Dakar", "Denver", "Austin", "Seattle", "Miami", "New York", "Los Angeles", "Buenos Aires",
    "Cape Town", "Mexico City", "Rio de Janeiro", "São Paulo", "Zürich", "Kraków", "Reykjavík",
)  # fmt: skip
AGENT_SKIES = ("sunny", "cloudy", "rainy", "snowy", "windy", "foggy", "stormy")
AGENT_MAX_BARKS = 10  # bark(times): 1..10
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
# Requests: each phrasing has one slot ({item}, {city}, or {times}: "once", "3 times", "three times").
FETCH_PHRASES = (
    "fetch the {item}", "Fetch my {item}!", "can you get my {item}?", "Please bring me the {item}.",
    "go get the {item}", "I need my {item}, can you fetch it?", "where is my {item}? bring it here",
    "bring the {item} please", "Could you fetch the {item} for me?", "get the {item}, good dog",
)  # fmt: skip
BARK_PHRASES = (
    "bark {times}", "Bark {times}!", "can you bark {times}?", "please bark {times}", "let me hear you bark {times}",
    "woof {times} for me", "Speak {times}.", "Could you bark {times} for me?",
)  # fmt: skip
WEATHER_PHRASES = (
    "what's the weather in {city}?", "What is the weather like in {city}?", "is it raining in {city}?",
    "how warm is it in {city}?", "weather in {city} please", "tell me the weather for {city}",
    "Should I take an umbrella in {city}?", "check the weather in {city}",
)  # fmt: skip
# Answers in words, from the tool's result.
FETCH_FOUND = ("Here is your {item}! Woof!", "I brought you the {item}.", "Got it! Here is the {item}.")
FETCH_LOST = ("Sorry, I could not find the {item}.", "I looked everywhere, but the {item} is not there.")
BARK_DONE = ("{Sound}!", "{Sound}! That was {times} barks.")
WEATHER_SAYS = ("It is {sky} and {temperature_c}°C in {city}.", "In {city} it is {sky}, {temperature_c} degrees.")
# Requests that need no tool, and their answers.
AGENT_SMALL_TALK = {
    "hello": ("Woof! Hello!", "Hi there! Woof!"),
    "Who is a good dog?": ("I am! Woof woof!",),
    "what is your name?": ("I am Bark, a dog with tools.",),
    "thank you": ("You are welcome! Woof!",),
    "Do you like cats?": ("Cats are fine, but I like balls more.",),
    "good night": ("Good night! Woof.",),
    "how are you?": ("I am a happy dog!",),
    "What can you do?": ("I can fetch things, bark, and check the weather.",),
    "sit": ("I sit down. Woof.",),
    "Are you hungry?": ("Always! Woof!",),
}
AGENT_SYSTEM_PROMPTS = ("You are Bark, a helpful dog.", "You are a dog that can use tools.")
BARK_AGENT_CONVERSATIONS = 4000  # conversations in the `bark-agent` set
BARK_AGENT_VOCAB = 1024  # the byte-level BPE's vocabulary, trained on the set (plus the role tokens)
HELD_OUT_EVERY = 8  # one request (phrasing, value) in 8 is held out of training for bark_agent_eval


def _held_out(phrase: str, value) -> bool:
    """Whether the request ``phrase`` filled with ``value`` belongs to the eval's held-out share
    (a fixed 1 in ``HELD_OUT_EVERY`` of all requests, by CRC-32: the same in every run)."""
    return zlib.crc32(f"{phrase}|{value}".encode()) % HELD_OUT_EVERY == 0


def _times_text(n: int, rng: random.Random) -> str:
    """``n`` barks as a request says it: "once", "twice", "3 times", "three times", "one time"..."""
    if n <= 2 and rng.random() < 0.5:
        return ("once", "twice")[n - 1]
    count = str(n) if rng.random() < 0.5 else NUMBER_WORDS[n - 1]
    return f"{count} time" if n == 1 else f"{count} times"


def sample_agent_request(rng: random.Random, held_out: bool = False) -> dict:
    """One tool request: ``{"text", "name", "arguments"}`` (the user's words, the tool to call and
    its arguments), fetch, bark or weather equally often, its phrasing and value drawn uniformly.
    ``held_out`` draws only requests of the held-out share (see :func:`_held_out`), else only others.
    """
    while True:
        name = rng.choice(("fetch", "bark", "weather"))
        if name == "fetch":
            phrase, value = rng.choice(FETCH_PHRASES), rng.choice(AGENT_ITEMS)
            text, arguments = phrase.format(item=value), {"item": value}
        elif name == "bark":
            phrase, n = rng.choice(BARK_PHRASES), rng.randint(1, AGENT_MAX_BARKS)
            value = _times_text(n, rng)
            text, arguments = phrase.format(times=value), {"times": n}
        else:
            phrase, value = rng.choice(WEATHER_PHRASES), rng.choice(AGENT_CITIES)
            text, arguments = phrase.format(city=value), {"city": value}
        if _held_out(phrase, value) == held_out:
            return {"text": text, "name": name, "arguments": arguments}


def run_agent_tool(name: str, arguments: dict, rng: random.Random) -> str:
    """A made-up result of a tool call, as JSON text: ``fetch`` finds the item 4 times in 5,
    ``bark`` barks, ``weather`` draws a sky and a temperature (-5 to 35 °C)."""
    if name == "fetch":
        return json.dumps({"item": arguments["item"], "found": rng.random() < 0.8}, ensure_ascii=False)
    if name == "bark":
        return json.dumps({"sound": " ".join(["woof"] * arguments["times"])})
    return json.dumps(
        {"city": arguments["city"], "sky": rng.choice(AGENT_SKIES), "temperature_c": rng.randint(-5, 35)}, ensure_ascii=False
    )


def agent_answers(name: str, arguments: dict, result: str) -> list[str]:
    """The answers in words allowed once the tool's ``result`` (:func:`run_agent_tool`) is back."""
    r = json.loads(result)
    if name == "fetch":
        return [a.format(item=arguments["item"]) for a in (FETCH_FOUND if r["found"] else FETCH_LOST)]
    if name == "bark":
        return [a.format(Sound=r["sound"].capitalize(), times=arguments["times"]) for a in BARK_DONE]
    return [a.format(**r) for a in WEATHER_SAYS]


def tool_call_message(call_id: str, name: str, arguments: dict) -> dict:
    """An assistant message that calls ``name`` (OpenAI's shape; ``arguments`` as JSON text)."""
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}
    return {"role": "assistant", "content": None, "tool_calls": [call]}


def agent_exchange(rng: random.Random, call_id: str, held_out: bool = False) -> list[dict]:
    """One request and all that follows, in OpenAI messages: a tool request (4 in 5) gets an
    assistant ``tool_calls`` message, the ``tool`` result and an answer in words; small talk gets
    an answer in words."""
    if rng.random() < 0.2:
        text = rng.choice(list(AGENT_SMALL_TALK))
        return [{"role": "user", "content": text}, {"role": "assistant", "content": rng.choice(AGENT_SMALL_TALK[text])}]
    req = sample_agent_request(rng, held_out)
    result = run_agent_tool(req["name"], req["arguments"], rng)
    return [
        {"role": "user", "content": req["text"]},
        tool_call_message(call_id, req["name"], req["arguments"]),
        {"role": "tool", "tool_call_id": call_id, "name": req["name"], "content": result},
        {"role": "assistant", "content": rng.choice(agent_answers(req["name"], req["arguments"], result))},
    ]


def agent_tools(rng: random.Random, needed: set[str]) -> list[dict]:
    """The ``tools`` a conversation offers: all three in a random order, or (1 in 5) a random
    subset that holds the ``needed`` ones, so the model reads the list rather than recites it."""
    tools = list(AGENT_TOOLS)
    if rng.random() < 0.2:
        tools = [t for t in tools if t["function"]["name"] in needed or rng.random() < 0.5] or [rng.choice(tools)]
    rng.shuffle(tools)
    return json.loads(json.dumps(tools))  # fresh dicts: callers may edit them


def bark_agent_conversations(n: int, seed: int, max_turns: int = 2) -> list[dict]:
    """``n`` generated agent conversations of 1 to ``max_turns`` requests (see :func:`agent_exchange`).

    Deterministic for ``seed``. Three in ten open with a system message. Requests of the held-out
    share (:func:`_held_out`) never appear: :func:`bark_agent_eval` asks those.

    Returns:
        ``[{"messages": [...], "tools": [...]}, ...]``: OpenAI messages and tool objects, the
        rows ``conversations.ChatRows`` renders with the tools.
    """
    rng = random.Random(seed)
    out = []
    for c in range(n):
        messages = [{"role": "system", "content": rng.choice(AGENT_SYSTEM_PROMPTS)}] if rng.random() < 0.3 else []
        for t in range(rng.randint(1, max_turns)):
            messages += agent_exchange(rng, f"call_{c:08d}{t:016d}")
        needed = {m["name"] for m in messages if m["role"] == "tool"}
        out.append({"messages": messages, "tools": agent_tools(rng, needed)})
    return out


def bark_agent_tokenizer(conversations: list[dict], vocab_size: int = BARK_AGENT_VOCAB) -> Tokenizer:
    """A byte-level BPE trained on the rendered ``conversations``, with the chat role tokens.

    Byte-level, so it writes any JSON (the word Bark vocabularies have no ``{``); its chat template
    is ``CHAT_TOKENS_TEMPLATE``, which renders tools, tool calls and results (tokenizer.py).
    """
    boot, _ = Tokenizer.train("bpe", ["{}"], BPE_MIN_VOCAB).with_chat_tokens()  # renders, nothing more
    texts = [boot.apply_chat_template(c["messages"], add_generation_prompt=False, tools=c["tools"]) for c in conversations]
    roles = re.compile("|".join(map(re.escape, CHAT_TOKENS)))  # special tokens: kept out of the merges
    tokenizer, _ = Tokenizer.train("bpe", (roles.sub("", t) for t in texts), vocab_size).with_chat_tokens()
    return tokenizer


def bark_agent_rows(n_conversations: int = BARK_AGENT_CONVERSATIONS, val_fraction: float = 0.1, seed: int = 1337) -> ChatRows:
    """The ``bark-agent`` preset's data: :func:`bark_agent_conversations` over their own
    :func:`bark_agent_tokenizer`; the last ``val_fraction`` (at least one) is the val split."""
    convs = bark_agent_conversations(n_conversations, seed)
    n_val = max(1, round(n_conversations * val_fraction))
    meta = {"source": "bark-agent", "source_sha256": hashlib.sha256(json.dumps(convs).encode()).hexdigest()}
    return ChatRows(bark_agent_tokenizer(convs), {"train": convs[:-n_val], "val": convs[-n_val:]}, meta)


def build_bark_agent(out: Path, seed: int) -> ChatRows:
    """The ``bark-agent`` builder of the dataset hook: :func:`bark_agent_rows` from the run's ``seed``."""
    return bark_agent_rows(seed=seed)


def parse_agent_reply(text: str) -> tuple[str | None, list[dict] | None]:
    """Split a reply into its text and its tool calls, as the server does (tokenizer.py's format).

    Returns:
        ``(content, calls)``: the text before the first ``<tool_call>`` (stripped; None when
        empty) and the calls as ``{"name", "arguments"}`` dicts ([] when there are none), or
        ``calls`` None when a ``<tool_call>`` block is not a JSON object with a string ``name``
        and an object ``arguments``, or is not closed.
    """
    head, _, rest = text.partition(TOOL_CALL_OPEN)
    content = head.strip() or None
    if not _:
        return content, []
    calls = []
    for block in (TOOL_CALL_OPEN + rest).split(TOOL_CALL_OPEN)[1:]:
        body, closed, _tail = block.partition(TOOL_CALL_CLOSE)
        try:
            call = json.loads(body)
        except ValueError:
            return content, None
        if not (
            closed and isinstance(call, dict) and isinstance(call.get("name"), str) and isinstance(call.get("arguments"), dict)
        ):
            return content, None
        calls.append({"name": call["name"], "arguments": call["arguments"]})
    return content, calls


def valid_agent_call(call: dict, tools: list[dict]) -> bool:
    """Whether ``call`` names one of ``tools`` and its ``arguments`` fit that tool's
    ``parameters``: the required keys, no others, each of its declared type (string or integer)."""
    fn = next((t["function"] for t in tools if t["function"]["name"] == call["name"]), None)
    if fn is None:
        return False
    props, args = fn["parameters"]["properties"], call["arguments"]
    types = {"string": str, "integer": int}
    return set(fn["parameters"].get("required", ())) <= set(args) <= set(props) and all(
        isinstance(v, types[props[k]["type"]]) and not isinstance(v, bool) for k, v in args.items()
    )


def _agent_case(rng: random.Random, i: int) -> tuple[list[dict], list[dict], dict]:
    """One eval case: ``(messages, tools, request)``: a held-out request (see :func:`_held_out`)
    after an optional system message and 0 or 1 earlier exchanges drawn as training draws them."""
    messages = [{"role": "system", "content": rng.choice(AGENT_SYSTEM_PROMPTS)}] if rng.random() < 0.3 else []
    if rng.random() < 0.5:
        messages += agent_exchange(rng, f"call_{i:024d}")
    req = sample_agent_request(rng, held_out=True)
    tools = agent_tools(rng, {req["name"], *(m["name"] for m in messages if m["role"] == "tool")})
    return [*messages, {"role": "user", "content": req["text"]}], tools, req


def _agent_reply(gen, messages: list[dict], tools: list[dict], temperature: float, seed: int) -> str | None:
    """The model's reply to ``messages`` offered ``tools``, or None when it writes no ``<EOS>``
    within 48 tokens (a call is at most about 30)."""
    prompt = gen.tokenizer.apply_chat_template(messages, tools=tools)
    r = gen.complete(prompt, truncate=True, max_new_tokens=48, temperature=temperature, seed=seed)[0]
    return r.text if r.finish_reason == "stop" else None


def bark_agent_eval(gen, n: int = 100, seed: int = 0, temperature: float = 0.0) -> dict:
    """Tool use of a ``bark-agent`` model on ``n`` requests it never saw, under ``tool_choice: auto``
    (free decoding; each reply parsed with :func:`parse_agent_reply`).

    Each case (:func:`_agent_case`) asks a request of the held-out share, which training never
    generates, from a seed no training run uses (the string ``"bark-agent-eval:{seed}"``). A reply
    is *right* when it is exactly one call, of the requested tool with the requested arguments;
    *valid* when it makes calls and every one parses and fits its tool's parameters
    (:func:`valid_agent_call`). Then, given the right call and a made-up result, the next reply is
    *answered* when it is one of the answers in words allowed (:func:`agent_answers`). Last,
    ``n // 5`` small-talk requests (at least 1) are *talked* when the reply makes no call.

    Args:
        gen: a ``generate.TextGenerator`` over a model with this set's tokenizer (only its
            ``tokenizer`` and ``complete`` are used).
        temperature: 0 is greedy.

    Returns:
        Counts ``{"samples", "right", "valid", "answered", "talk_samples", "talked"}``, their
        ``*_share``, and up to 10 ``"failures"`` ``[{"request", "reply", "expected"}]``.

    Raises:
        BarkError: ``n`` < 1.
    """
    if n < 1:
        raise BarkError(f"the number of samples must be at least 1, got {n}")
    rng = random.Random(f"bark-agent-eval:{seed}")
    counts = dict.fromkeys(("right", "valid", "answered", "talked"), 0)
    failures = []
    for i in range(n):
        messages, tools, req = _agent_case(rng, i)
        text = _agent_reply(gen, messages, tools, temperature, seed + i)
        calls = parse_agent_reply(text)[1] if text is not None else None
        counts["valid"] += bool(calls) and all(valid_agent_call(c, tools) for c in calls)
        expected = {"name": req["name"], "arguments": req["arguments"]}
        counts["right"] += calls == [expected]
        if calls != [expected] and len(failures) < 10:
            failures.append({"request": req["text"], "reply": text, "expected": expected})
        result = run_agent_tool(req["name"], req["arguments"], rng)
        call_id = f"call_{i:024d}"
        after = [*messages, tool_call_message(call_id, **expected), {"role": "tool", "tool_call_id": call_id, "content": result}]
        answer = _agent_reply(gen, after, tools, temperature, seed + i)
        counts["answered"] += answer is not None and answer.strip() in agent_answers(req["name"], req["arguments"], result)
    talks = max(1, n // 5)
    for i in range(talks):
        text = _agent_reply(
            gen,
            [{"role": "user", "content": rng.choice(list(AGENT_SMALL_TALK))}],
            agent_tools(rng, set()),
            temperature,
            seed + n + i,
        )
        counts["talked"] += text is not None and parse_agent_reply(text)[1] == []
    shares = {f"{k}_share": v / (talks if k == "talked" else n) for k, v in counts.items()}
    return {"samples": n, "talk_samples": talks, **counts, **shares, "failures": failures}


register_dataset("bark", build_bark)
register_dataset("bark-chat", build_bark_chat)
register_dataset("bark-agent", build_bark_agent)
register_dataset("bark-dpo", build_bark_dpo)
