"""``barkgpt chat`` in a real terminal (a pty from Python's ``pty`` module): every slash command,
multi-line input, Ctrl-C during a reply, the history kept across sessions, and ``--url`` against
a real ``barkgpt serve`` with the ``openai`` client.

The model is untrained, with ``<EOS>`` scoring exactly 0 and no tied head, so greedy replies
never stop early: a reply runs to the end of the 1024-token context, long enough to Ctrl-C.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import sys
import time

import pytest

pytestmark = pytest.mark.integration

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A random model over the Bark chat vocabulary whose greedy replies never end early."""
    import torch

    from barkgpt.bark import bark_chat_tokenizer
    from barkgpt.checkpoint import save_checkpoint
    from barkgpt.config import GPTConfig
    from barkgpt.model import GPT

    tok = bark_chat_tokenizer()
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=1024, n_layer=2, n_head=4, n_embd=128, tie_embeddings=False)
    model = GPT(cfg)
    with torch.no_grad():
        model.lm_head.weight[tok.eos_id] = 0  # its logit is 0: greedy decoding never picks it
    out = tmp_path_factory.mktemp("chat") / "model"
    save_checkpoint(out, model, tok, {"step": 0})
    return out


class Terminal:
    """A ``barkgpt chat`` process on a pty (its controlling terminal, so ^C is a real SIGINT)."""

    def __init__(self, args: list[str], env: dict):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its stdin, stdout and controlling terminal
            os.execvpe(sys.executable, [sys.executable, "-m", "barkgpt", "chat", *args], env)
        self.text = ""

    def read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if ready:
            try:
                self.text += ANSI.sub("", os.read(self.fd, 65536).decode("utf-8", "replace")).replace("\r", "")
            except OSError:  # the child closed the pty
                pass

    def expect(self, pattern: str, timeout: float = 60) -> str:
        """Wait for ``pattern`` (a regex) after the last match; return the text up to its end."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            m = rx.search(self.text)
            if m:
                seen, self.text = self.text[: m.end()], self.text[m.end() :]
                return seen
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} in the terminal within {timeout} s; it shows:\n{self.text[-2000:]}")
            self.read(0.1)

    def send(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode())

    def close(self) -> int:
        """Wait for the process to end (killed after 20 s); its exit status."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            self.read(0.1)
        os.kill(self.pid, signal.SIGKILL)
        return os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "OMP_NUM_THREADS": "1", "XDG_DATA_HOME": str(tmp_path / "data"), "TERM": "dumb"}


def test_every_slash_command_and_ctrl_c_in_a_real_terminal(chat_model, env, tmp_path):
    t = Terminal(["--model", str(chat_model), "--device", "cpu", "--temperature", "0", "--max-new-tokens", "4"], env)
    t.expect(r"block_size 1024\); /help")
    t.expect("you> ")
    t.send("/help")
    assert "/max_tokens N" in t.expect("you> ")
    for cmd, said in (("/temperature 0", "temperature 0.0"), ("/top_p 0.9", "top_p 0.9"), ("/top_k 5", "top_k 5")):
        t.send(cmd)
        assert said in t.expect("you> ")
    t.send("/top_p 7")
    assert "top_p must be in (0, 1]" in t.expect("you> ")
    t.send("/system Be a good dog.")
    assert "system message set" in t.expect("you> ")
    t.send("speak")
    stats = t.expect("you> ")
    assert re.search(r"bot> \S.*\n4 tokens, [\d.]+ tokens/s", stats), stats  # the reply, then the dim line (ANSI stripped)
    t.send("sit \\")  # a trailing backslash continues the message
    t.send("down")
    t.expect("you> ")
    t.send('"""')  # a block
    t.send("play")
    t.send("fetch")
    t.send('"""')
    t.expect("you> ")
    t.send("/history")
    history = t.expect("you> ")
    assert "system: Be a good dog." in history and "user: sit \ndown" in history and "user: play\nfetch" in history
    t.send(f"/save {tmp_path / 'chats.jsonl'}")
    assert "saved 7 messages" in t.expect("you> ")
    saved = json.loads((tmp_path / "chats.jsonl").read_text())
    assert [m["role"] for m in saved["messages"]] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    t.send("/info")
    info = t.expect("you> ")
    assert "block_size 1024" in info and "parameters" in info and "chat template" in info and "top_k 5" in info
    t.send("/load /nonexistent/run")
    assert "error:" in t.expect("you> ")
    t.send(f"/load {chat_model}")
    assert "loaded" in t.expect("you> ")
    # A long reply (the whole context), stopped with Ctrl-C: the chat goes on.
    t.send("/max_tokens 5000")
    t.expect("you> ")
    t.send("speak")
    t.expect(r"bot> \S+ \S+ \S+")  # the reply is streaming
    os.write(t.fd, b"\x03")
    assert re.search(r"\[stopped\] \d+ tokens", t.expect("you> "))
    t.send("/new")
    assert "new conversation" in t.expect("you> ")
    t.send("/history")
    assert "user:" not in t.expect("you> ")
    # A long conversation outgrows the context: the oldest turns go, and the CLI says so.
    t.send("/max_tokens 400")  # the prompt may take 1024 - 256 tokens, leaving a quarter for the reply
    t.expect("you> ")
    for message in ("speak", "growl"):  # ~410, then ~810 tokens
        t.send(message)
        assert "dropped" not in t.expect("you> ", timeout=120)
    t.send("sit")
    assert "outgrew the 1024-token context: dropped the oldest 1 turn(s)" in t.expect("you> ", timeout=120)
    t.send("/quit")
    assert t.close() == 0
    history = (tmp_path / "data" / "barkgpt" / "chat_history").read_text()
    assert "/top_k 5" in history and "/quit" in history


def test_history_is_there_in_the_next_session(chat_model, env):
    first = Terminal(["--model", str(chat_model), "--device", "cpu"], env)
    first.expect("you> ")
    first.send("/top_k 7")
    first.expect("you> ")
    os.write(first.fd, b"\x04")  # Ctrl-D leaves
    assert first.close() == 0
    second = Terminal(["--model", str(chat_model), "--device", "cpu"], env)
    second.expect("you> ")
    os.write(second.fd, b"\x1b[A\n")  # up arrow: the last line of the previous session, then Enter
    assert "top_k 7" in second.expect("you> ")
    second.send("/quit")
    assert second.close() == 0


def test_url_mode_against_a_real_server(chat_model, env, tmp_path):
    pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from test_server import KEY, launch, stop, wait_ready  # tests/integration is on sys.path (rootdir conftest)

    proc, base = launch(chat_model, "dog")
    try:
        wait_ready(proc, base)
        t = Terminal(["--url", base + "/v1", "--max-new-tokens", "3", "--temperature", "0"], {**env, "BARKGPT_API_KEY": KEY})
        t.expect(r"chatting with dog \(block_size 1024\)")
        t.expect("you> ")
        t.send("/info")
        assert f"model dog at {base}/v1" in t.expect("you> ")
        t.send("/top_k 3")
        t.expect("you> ")
        t.send("speak")
        assert re.search(r"bot> \S.*\n3 tokens, [\d.]+ tokens/s", t.expect("you> "))
        t.send(f"/save {tmp_path / 'remote.jsonl'}")
        assert "saved 2 messages" in t.expect("you> ")
        t.send("/load cat")
        assert "not 'cat'" in t.expect("you> ")
        t.send("/max_tokens 900")
        t.expect("you> ")
        t.send("speak")
        t.expect(r"bot> \S+ \S+ \S+")
        os.write(t.fd, b"\x03")
        assert "[stopped]" in t.expect("you> ")
        t.send("/quit")
        assert t.close() == 0
    finally:
        stop(proc)
