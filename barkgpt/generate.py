"""Text in, text out: a tokenizer wrapped around the token-level :class:`~barkgpt.engine.Engine`.

Adds what needs text: encoding the prompt, incremental UTF-8-safe decoding for streaming, stop
strings (held back until they can no longer match), chat templates, and ``--truncate``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from barkgpt.checkpoint import load_checkpoint
from barkgpt.common import BarkError, resolve_device
from barkgpt.config import SamplingParams
from barkgpt.tokenizer import Tokenizer

if TYPE_CHECKING:  # torch loads with the engine, in TextGenerator(): the NumPy backend's generator
    from barkgpt.model import GPT  # subclasses this one and never imports torch


class TextGenerator:
    """Generate text from a model and its tokenizer.

    Args:
        model: the :class:`GPT`.
        tokenizer: the :class:`Tokenizer` it was trained with.
        config: the checkpoint's ``config.json`` dict (shown by ``info``), optional.
        compile: ``torch.compile`` the decode step (see :class:`~barkgpt.engine.Engine`).
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, config: dict | None = None, compile: bool = False):
        from barkgpt.engine import Engine

        self.model, self.tokenizer, self.config = model, tokenizer, config or {}
        self.engine = Engine(model, compile=compile)

    @property
    def block_size(self) -> int:
        """The model's context length in tokens."""
        return self.model.config.block_size

    def encode_prompt(self, prompt: str, truncate: bool = False) -> list[int]:
        """Prompt text -> ids; an empty prompt starts from ``<EOS>`` (a document boundary).

        Raises:
            BarkError: the prompt is longer than ``block_size`` tokens and ``truncate`` is off.
        """
        ids = self.tokenizer.encode(prompt) if prompt else [self.tokenizer.eos_id]
        if len(ids) > self.block_size:
            if not truncate:
                raise BarkError(
                    f"the prompt has {len(ids)} tokens but the model's block_size is {self.block_size}; shorten it or pass --truncate to keep its last {self.block_size} tokens"
                )
            ids = ids[-self.block_size :]
        return ids

    def stream(self, prompt: str, truncate: bool = False, constraint=None, logit_bias=None, **sampling) -> Iterator[str]:
        """Yield the reply to ``prompt`` piece by piece as it is generated (one sample).

        Keyword args are :class:`~barkgpt.config.SamplingParams` fields, plus ``constraint`` (a
        :class:`~barkgpt.structured.Constraint` the reply must satisfy) and ``logit_bias`` (token
        id -> bias in [-100, 100]). Generation ends at ``<EOS>`` (not emitted), a stop string
        (not emitted), or ``max_new_tokens``. Concatenated pieces equal ``generate(...)`` with the
        same arguments.

        Raises:
            BarkError: bad sampling values, an over-long prompt, or a constraint this model's
                tokenizer cannot write or the grammar library cannot compile.
        """
        cfg = SamplingParams(**{**sampling, "num_samples": 1})
        ids = self.encode_prompt(prompt, truncate)
        hooks = self._hooks(constraint, logit_bias)
        yield from _TextStream(self.tokenizer, (s[0] for s in self._steps(ids, cfg, hooks)), cfg.stop)

    def generate(self, prompt: str, truncate: bool = False, **sampling) -> str | list[str]:
        """The full reply to ``prompt``: a string, or a list of strings when ``num_samples`` is given
        (keyword args as :meth:`stream`'s).

        Raises:
            BarkError: bad sampling values, an over-long prompt or a bad constraint.
        """
        texts = [c.text for c in self.complete(prompt, truncate, **sampling)]
        return texts if "num_samples" in sampling else texts[0]

    def chat_prompt(self, messages: list[dict]) -> str:
        """Render ``messages`` (``role``/``content`` dicts) with the model's chat template."""
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def complete(self, prompt: str, truncate: bool = False, constraint=None, logit_bias=None, **sampling) -> list[Completion]:
        """Generate ``num_samples`` replies together, with their finish reasons (keyword args are
        :class:`~barkgpt.config.SamplingParams` fields, ``constraint`` and ``logit_bias`` as in
        :meth:`stream`).

        Raises:
            BarkError: bad sampling values, an over-long prompt or a bad constraint.
        """
        cfg = SamplingParams(**sampling)
        ids = self.encode_prompt(prompt, truncate)
        columns: list[list[int]] = [[] for _ in range(cfg.num_samples)]
        for step in self._steps(ids, cfg, self._hooks(constraint, logit_bias)):
            for b, t in enumerate(step):
                if t is not None:
                    columns[b].append(t)
        out = []
        for col in columns:
            stream = _TextStream(self.tokenizer, iter(col), cfg.stop)
            text = "".join(stream)
            out.append(Completion(text, stream.finish_reason, len(ids), stream.n_tokens))
        return out

    def _hooks(self, constraint, logit_bias) -> list:
        """The engine row hooks of a constraint and a logit bias (:mod:`barkgpt.structured`); none without."""
        if constraint is None and not logit_bias:
            return []
        from barkgpt.structured import processors_for

        return processors_for(self.tokenizer, constraint, logit_bias=logit_bias)

    def _steps(self, ids: list[int], cfg: SamplingParams, hooks=()):
        return self.engine.generate(ids, cfg, stop_ids=[self.tokenizer.eos_id], processors=hooks)


@dataclass
class Completion:
    """One generated reply: ``text``, ``finish_reason`` (``stop`` or ``length``), and token counts."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class TextDecoder:
    """Turn token ids, pushed one at a time, into text pieces that end at ``<EOS>`` or a stop string.

    Text that could still be the start of a stop string is held back until it cannot. Push ids
    with :meth:`add` until ``done``, then call :meth:`flush` (a no-op once ``done``).
    ``finish_reason`` is ``"stop"`` (EOS or a stop string) or ``"length"``, and ``n_tokens``
    counts the ids pushed (the EOS included). The server uses this on tokens arriving from its
    scheduler; :class:`_TextStream` uses it on an iterator.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.eos_id, self.stop = tokenizer.eos_id, list(stop)
        self.finish_reason, self.n_tokens, self.done = "length", 0, False
        self._decoder = tokenizer.decoder(continuation=True)
        self._pending = ""
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def _cut(self, text: str) -> int:
        return min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)

    def add(self, t: int) -> str:
        """Push one token id; return the text that can be shown now (possibly ``""``)."""
        self.n_tokens += 1
        if t == self.eos_id:
            self.finish_reason = "stop"
            return self.flush()
        self._pending += self._decoder.add(t)
        cut = self._cut(self._pending)
        if cut >= 0:
            self.finish_reason, self.done = "stop", True
            return self._pending[:cut]
        if len(self._pending) > self._hold:  # emit what can no longer be part of a stop string
            n = len(self._pending) - self._hold
            out, self._pending = self._pending[:n], self._pending[n:]
            return out
        return ""

    def flush(self) -> str:
        """End the text: return what was held back (cut at a stop string)."""
        if self.done:
            return ""
        self.done = True
        pending = self._pending + self._decoder.flush()
        cut = self._cut(pending)
        if cut >= 0:
            self.finish_reason, pending = "stop", pending[:cut]
        return pending


class _TextStream:
    """Decode an iterator of token ids (None ends it) into text pieces, with a :class:`TextDecoder`.

    After iteration, ``finish_reason`` and ``n_tokens`` are the decoder's.
    """

    def __init__(self, tokenizer: Tokenizer, tokens, stop: list[str]):
        self.tokens, self.decoder = tokens, TextDecoder(tokenizer, stop)

    @property
    def finish_reason(self) -> str:
        """``"stop"`` (EOS or a stop string) or ``"length"``."""
        return self.decoder.finish_reason

    @property
    def n_tokens(self) -> int:
        """Tokens consumed so far, the EOS included."""
        return self.decoder.n_tokens

    def __iter__(self) -> Iterator[str]:
        for t in self.tokens:
            if t is None:
                break
            piece = self.decoder.add(t)
            if piece:
                yield piece
            if self.decoder.done:
                return
        piece = self.decoder.flush()
        if piece:
            yield piece


def load_generator(path: str | Path, device: str = "auto", compile: bool = False) -> TextGenerator:
    """Load a run or checkpoint folder into a :class:`TextGenerator` (``compile``: see
    :class:`~barkgpt.engine.Engine`).

    Raises:
        BarkError: no checkpoint or a corrupt one (see :func:`barkgpt.checkpoint.load_model`).
    """
    model, tokenizer, config = load_checkpoint(path, resolve_device(device))
    return TextGenerator(model, tokenizer, config, compile=compile)
