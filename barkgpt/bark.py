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
from collections.abc import Iterator
from pathlib import Path

from barkgpt.common import BarkError
from barkgpt.conversations import ChatRows
from barkgpt.data import prepare_documents, register_dataset
from barkgpt.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, UNK, Tokenizer

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
    one of the four commands must get exactly ``ruff?``.
    """
    words = reply.split()
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
        ``{"samples": n, "passed": int, "share": float, "failures": [{"command", "reply", "finish_reason"}, ...]}``.

    Raises:
        BarkError: ``n`` < 1.
    """
    if n < 1:
        raise BarkError(f"the number of samples must be at least 1, got {n}")
    rng = random.Random(seed)
    history_pool = bark_chat_conversations(n, seed + 1, max_turns=2)
    passed, failures = 0, []
    for i in range(n):
        history = history_pool[i][: 2 * rng.randint(0, len(history_pool[i]) // 2)]
        command = sample_bark_command(rng)
        prompt = gen.chat_prompt([*history, {"role": "user", "content": command}])
        reply = gen.complete(prompt, truncate=True, max_new_tokens=16, temperature=temperature, seed=seed + i)[0]
        if reply.finish_reason == "stop" and follows_bark_rule(command, reply.text):
            passed += 1
        else:
            failures.append({"command": command, "reply": reply.text.strip(), "finish_reason": reply.finish_reason})
    return {"samples": n, "passed": passed, "share": passed / n, "failures": failures}


register_dataset("bark", build_bark)
register_dataset("bark-chat", build_bark_chat)
