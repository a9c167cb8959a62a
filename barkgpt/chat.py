"""The ``barkgpt chat`` REPL: a conversation with a local model or a served one.

- **Backends**: :class:`LocalChat` over a ``TextGenerator`` (:func:`open_generator`, the one
  place a model is opened for chat: ``torch`` or ``numpy``), and :class:`RemoteChat` over any
  OpenAI-compatible server (``--url http://127.0.0.1:8000/v1``) with the real ``openai`` client.
- **Slash commands** (:data:`HELP`): sampling settings, the system message, a new conversation,
  the history, ``/save FILE`` (one ``{"messages": [...]}`` JSONL row, ready for ``finetune``),
  ``/load RUN`` (switch model), ``/info`` and ``/help``.
- **The terminal**: readline line editing, with the history kept across sessions in the user's
  data folder (``$XDG_DATA_HOME/barkgpt`` or ``~/.local/share/barkgpt``); multi-line input (a
  trailing backslash continues the line; a ``\"\"\"`` line opens and closes a block); Ctrl-C stops
  a reply and keeps the chat (Ctrl-D or ``/quit`` leaves); a dim line after each reply with its
  tokens and tokens/s; the oldest turns are dropped, with a note, when the conversation
  outgrows the context. With stdin not a terminal (piped), each line is one message and only
  the replies are printed, as before.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

from barkgpt.common import BarkError
from barkgpt.config import SamplingParams

HELP = """commands:
  /temperature X   sampling temperature (0 is greedy)      /top_p X      nucleus sampling (1 is off)
  /top_k N         keep the N most likely tokens (0 is off) /max_tokens N  the longest reply in tokens
  /system TEXT     set the system message (/system alone clears it)
  /new             start a new conversation                 /history      show this conversation
  /save FILE       append this conversation to FILE as a {"messages": [...]} JSONL row (for finetune)
  /load RUN        switch to another model (a run or checkpoint folder; with --url, a model name)
  /info            model, parameters, block size, chat template   /help   this list   /quit   leave
input: a line ending in \\ continues on the next line; a line of \"\"\" starts and ends a block.
Ctrl-C stops a reply; Ctrl-D or /quit leaves."""
SETTINGS = {"temperature": float, "top_p": float, "top_k": int, "max_tokens": int}
DIM, RESET = "\x1b[2m", "\x1b[0m"
# C0 and C1 control characters but tab and newline: a reply (from a model, or a server over the
# network) that holds them could move the cursor, retitle the window or, with OSC 52, write the
# clipboard of the terminal it is printed on.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def terminal_safe(text: str) -> str:
    """``text`` with its control characters but tab and newline shown as ``\\xNN`` escapes, for
    printing model and server text on a terminal (the conversation keeps the text as it came)."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def open_generator(model: str | Path, device: str = "auto", compile: bool = False, backend: str = "torch"):
    """Open a run or checkpoint folder as a text generator: ``generate.load_generator`` for
    ``torch``, ``barkgpt.numpy.generate.load_generator`` for ``numpy``.

    Raises:
        BarkError: an unknown backend, or as the loader raises (no checkpoint...).
    """
    if backend == "torch":
        from barkgpt.generate import load_generator
    elif backend == "numpy":
        from barkgpt.numpy.generate import load_generator
    else:
        raise BarkError(f"backend must be torch or numpy, got {backend!r}")
    return load_generator(model, device=device, compile=compile)


def history_path() -> Path:
    """The readline history file: ``$XDG_DATA_HOME/barkgpt/chat_history`` (XDG Base Directory
    spec), else ``~/.local/share/barkgpt/chat_history``."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "barkgpt" / "chat_history"


class LocalChat:
    """A local model for the REPL: replies streamed from a ``TextGenerator``.

    Args:
        model: the run or checkpoint folder; device, compile, backend: as :func:`open_generator`.
    """

    def __init__(self, model: str, device: str = "auto", compile: bool = False, backend: str = "torch"):
        self.device, self.compile, self.backend = device, compile, backend
        self.load(model)

    def load(self, model: str) -> None:
        """Open ``model`` (``/load``); the old one stays if this raises ``BarkError``."""
        self.gen, self.name = open_generator(model, self.device, self.compile, self.backend), model

    @property
    def block_size(self) -> int:
        """The context in tokens."""
        return self.gen.block_size

    def count(self, messages: list[dict]) -> int:
        """Tokens of the prompt that ``messages`` render to (with the generation prompt)."""
        return len(self.gen.tokenizer.encode(self.gen.chat_prompt(messages)))

    def stream(self, messages: list[dict], sampling: dict):
        """Yield the reply's text pieces (stopping early closes the generator)."""
        yield from self.gen.stream(self.gen.chat_prompt(messages), truncate=True, **sampling)

    def tokens(self, text: str) -> int:
        """Tokens in a reply's text (its ``<EOS>``, if any, not counted)."""
        return len(self.gen.tokenizer.encode(text))

    def info(self) -> str:
        """``/info``'s lines: model, parameters, block size, chat template."""
        model = self.gen.model
        params = model.num_params() if hasattr(model, "num_params") else None
        size = f"{params / 1e6:.2f}M parameters, " if params else ""
        tok = self.gen.tokenizer
        return (
            f"model {self.name} ({self.backend}): {size}block_size {self.block_size}, "
            f"{tok.kind} tokenizer with {tok.vocab_size} tokens\nchat template:\n{tok.chat_template}"
        )


class RemoteChat:
    """A served model for the REPL, over the OpenAI API with the ``openai`` client.

    The API key is ``BARKGPT_API_KEY`` or ``OPENAI_API_KEY`` (none needed by a keyless server).

    Raises:
        BarkError: the ``openai`` package is missing or the server cannot be reached.
    """

    def __init__(self, url: str, model: str | None = None):
        try:
            from openai import OpenAI
        except ImportError:
            raise BarkError("barkgpt chat --url needs the openai package; pip install 'barkgpt[chat]'") from None
        key = os.environ.get("BARKGPT_API_KEY") or os.environ.get("OPENAI_API_KEY") or "none"
        self.client, self.url = OpenAI(base_url=url, api_key=key, max_retries=0), url
        self.last_usage = None
        self.load(model)

    def load(self, model: str | None) -> None:
        """Pick the served model ``model`` (``/load NAME``), or the server's first one."""
        import openai

        try:
            models = {m.id: m for m in self.client.models.list()}
        except openai.OpenAIError as e:
            raise BarkError(
                f"cannot list the models at {self.url} ({type(e).__name__}); is barkgpt serve running there?"
            ) from None
        if model is not None and model not in models:
            raise BarkError(f"{self.url} serves {', '.join(models) or 'no model'}, not {model!r}")
        self.name = model or next(iter(models), None)
        self.entry = models.get(self.name)
        if self.name is None:
            raise BarkError(f"{self.url} serves no model")

    @property
    def block_size(self) -> int | None:
        """The context in tokens (the server's ``max_model_len``), or None when it says none."""
        return getattr(self.entry, "max_model_len", None) or (self.entry.model_extra or {}).get("max_model_len")

    def count(self, messages: list[dict]) -> int:
        """A rough token count (characters / 4: no tokenizer here), for the context cut."""
        return sum(len(m["content"]) for m in messages) // 4 + 4 * len(messages)

    def stream(self, messages: list[dict], sampling: dict):
        """Yield the reply's text pieces from a streamed chat completion; the usage chunk's
        ``completion_tokens`` is kept for :meth:`tokens`."""
        kw = {"temperature": sampling.get("temperature"), "top_p": sampling.get("top_p")}
        if sampling.get("max_new_tokens"):
            kw["max_tokens"] = sampling["max_new_tokens"]
        extra = {"top_k": sampling["top_k"]} if sampling.get("top_k") else None
        self.last_usage = None
        stream = self.client.chat.completions.create(
            model=self.name,
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra,
            **{k: v for k, v in kw.items() if v is not None},
        )
        try:
            for chunk in stream:
                if chunk.usage is not None:
                    self.last_usage = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    if choice.delta.content:
                        yield choice.delta.content
        finally:
            stream.close()  # a stopped reply closes the connection: the server stops generating

    def tokens(self, text: str) -> int:
        """The reply's tokens as the server counted them (a rough count when it did not say)."""
        return self.last_usage if self.last_usage is not None else max(1, len(text) // 4)

    def info(self) -> str:
        """``/info``'s line: server, model, context."""
        return f"model {self.name} at {self.url}: block_size {self.block_size or 'unknown'}"


class ChatSession:
    """The conversation and its settings, and the slash commands that change them.

    Args:
        backend: a :class:`LocalChat` or :class:`RemoteChat`.
        sampling: SamplingParams fields (``max_new_tokens``, ``temperature``...).
        system: the system message ('' for none).
        out: where replies and notes go (stdout).
        interactive: a terminal: prompts, notes and the dim stats line are printed.
    """

    def __init__(self, backend, sampling: dict, system: str = "", out=sys.stdout, interactive: bool = True):
        self.backend, self.sampling, self.system = backend, dict(sampling), system
        self.out, self.interactive = out, interactive
        self.messages: list[dict] = []

    def note(self, text: str) -> None:
        """Print a note (interactive only; piped output holds replies alone)."""
        if self.interactive:
            print(text, file=self.out, flush=True)

    def conversation(self) -> list[dict]:
        """The messages sent: the system message (if any), then the turns."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def fit_context(self) -> None:
        """Drop the oldest turns until the prompt leaves room for a reply, and say so."""
        block = self.backend.block_size
        if not block:
            return
        room = max(8, min(self.sampling.get("max_new_tokens", 200), block // 4))
        dropped = 0
        while self.backend.count(self.conversation()) > block - room and len(self.messages) > 1:
            cut = next((i for i in range(1, len(self.messages)) if self.messages[i]["role"] == "user"), len(self.messages) - 1)
            del self.messages[:cut]
            dropped += 1
        if dropped:
            self.note(f"(the conversation outgrew the {block}-token context: dropped the oldest {dropped} turn(s))")

    def reply(self, text: str) -> str:
        """Send one user message and stream the reply; Ctrl-C stops it (the part so far is kept).

        Returns:
            The reply's text.
        """
        self.messages.append({"role": "user", "content": text})
        self.fit_context()
        if self.interactive:
            self.out.write("bot> ")
        pieces, t0, stopped = [], time.perf_counter(), False
        stream = self.backend.stream(self.conversation(), self.sampling)
        try:
            for piece in stream:
                if not pieces:
                    piece = piece.lstrip()  # the reply continues the template's "Assistant:"
                pieces.append(piece)
                self.out.write(terminal_safe(piece))
                self.out.flush()
        except KeyboardInterrupt:
            stopped = True
            stream.close()
        reply = "".join(pieces).strip()
        self.out.write("\n")
        self.messages.append({"role": "assistant", "content": reply})
        seconds = time.perf_counter() - t0
        n = self.backend.tokens(reply)
        self.note(f"{DIM}{'[stopped] ' if stopped else ''}{n} tokens, {n / max(seconds, 1e-9):.1f} tokens/s{RESET}")
        return reply

    def command(self, line: str) -> bool:
        """Run a slash command; returns False for ``/quit``.

        Raises:
            BarkError: a bad value or an unknown command (the REPL prints it and goes on).
        """
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if name in ("quit", "exit"):
            return False
        if name in SETTINGS:
            self.set_sampling(name, arg)
        elif name == "system":
            self.system = arg
            self.note(f"system message {'set' if arg else 'cleared'}")
        elif name in ("new", "reset"):
            self.messages = []
            self.note("new conversation")
        elif name == "history":
            for m in self.conversation():
                self.note(f"{m['role']}: {terminal_safe(m['content'])}")
        elif name == "save":
            self.save(arg)
        elif name == "load":
            if not arg:
                raise BarkError("/load needs a run or checkpoint folder (or, with --url, a model name)")
            self.backend.load(arg)
            self.note(f"loaded {arg}")
        elif name == "info":
            settings = ", ".join(f"{k} {v}" for k, v in self.sampling.items())
            self.note(f"{terminal_safe(self.backend.info())}\nsampling: {settings}")
        elif name == "help":
            self.note(HELP)
        else:
            raise BarkError(f"unknown command /{name}; /help lists them")
        return True

    def set_sampling(self, name: str, arg: str) -> None:
        """``/temperature`` and friends: set one sampling field, checked as SamplingParams checks it.

        Raises:
            BarkError: a value of the wrong type or out of range.
        """
        field = "max_new_tokens" if name == "max_tokens" else name
        try:
            value = SETTINGS[name](arg)
        except ValueError:
            raise BarkError(f"/{name} needs a {SETTINGS[name].__name__}, got {arg!r}") from None
        new = {**self.sampling, field: value}
        SamplingParams(**new)  # one clear line for a bad value
        self.sampling = new
        self.note(f"{name} {value}")

    def save(self, path: str) -> None:
        """``/save FILE``: append the conversation as one ``{"messages": [...]}`` JSONL row.

        Raises:
            BarkError: no file named, nothing to save, or the file cannot be written.
        """
        if not path:
            raise BarkError("/save needs a file name, e.g. /save chats.jsonl")
        if not self.messages:
            raise BarkError("nothing to save yet: the conversation is empty")
        try:
            with open(Path(path).expanduser(), "a", encoding="utf-8") as f:
                f.write(json.dumps({"messages": self.conversation()}, ensure_ascii=False) + "\n")
        except OSError as e:
            raise BarkError(f"cannot write {path}: {e.strerror}") from None
        self.note(f"saved {len(self.conversation())} messages to {path}")


def read_message(interactive: bool) -> str | None:
    """One message from stdin: a line, a line ending in ``\\`` continued by the next, or a
    ``\"\"\"`` block; None at end of input. Ctrl-C at the prompt raises ``KeyboardInterrupt``."""
    prompt, more = ("you> ", "...  ") if interactive else ("", "")
    try:
        line = input(prompt)
    except EOFError:
        return None
    if line.strip() == '"""':
        lines = []
        while True:
            try:
                line = input(more)
            except EOFError:
                break
            if line.strip() == '"""':
                break
            lines.append(line)
        return "\n".join(lines)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        try:
            line = input(more)
        except EOFError:
            line = ""
            break
    return "\n".join([*lines, line])


def start_readline() -> None:
    """Line editing and the history across sessions (:func:`history_path`), saved at exit;
    nothing where Python has no readline."""
    try:
        import readline
    except ImportError:
        return
    import atexit

    path = history_path()
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)

    def save() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError:
            pass

    atexit.register(save)


def run_chat(session: ChatSession, interactive: bool) -> None:
    """The REPL loop: read a message, run it as a command or send it, until Ctrl-D or ``/quit``."""
    if interactive:
        start_readline()
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN and threading.current_thread() is threading.main_thread():
            # started with SIGINT ignored (a shell's background job, nohup): Python then keeps it
            # ignored, and Ctrl-C could not stop a reply; a terminal chat wants it back
            signal.signal(signal.SIGINT, signal.default_int_handler)
    while True:
        try:
            text = read_message(interactive)
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /quit to leave)", flush=True)
            continue
        if text is None:
            break
        if not text.strip():
            continue
        if text.startswith("/"):
            try:
                if not session.command(text.strip()):
                    break
            except BarkError as e:
                print(f"error: {terminal_safe(str(e))}", file=sys.stderr if not interactive else session.out, flush=True)
            continue
        session.reply(text)


def chat(args, sampling: dict) -> None:
    """``barkgpt chat``: open the backend (``--url`` or ``--model``) and run the REPL.

    Raises:
        BarkError: neither ``--model`` nor ``--url``, or as the backend raises.
    """
    if args.url:
        backend = RemoteChat(args.url, args.model)
    elif args.model:
        backend = LocalChat(args.model, args.device, args.compile, getattr(args, "backend", "torch"))
    else:
        raise BarkError("barkgpt chat needs --model RUN (a local model) or --url URL (a served one)")
    interactive = sys.stdin.isatty()
    session = ChatSession(backend, sampling, args.system, sys.stdout, interactive)
    block = backend.block_size
    session.note(f"chatting with {backend.name} (block_size {block or 'unknown'}); /help for commands, Ctrl-D to quit")
    run_chat(session, interactive)
