"""What ``barkgpt chat`` prints of a reply: control characters from a model or a server (cursor
moves, window titles, OSC 52 clipboard writes) are shown escaped, never sent to the terminal;
the conversation and ``/save`` keep the text as it came."""

import io
import json

from barkgpt.chat import ChatSession, terminal_safe

HOSTILE = "ok \x1b]52;c;ZXZpbA==\x07\x1b[2J\rdone\tend\x9b"


class ScriptedBackend:
    """A backend whose reply is fixed text in two pieces (the model side is tested elsewhere)."""

    block_size = 1024

    def stream(self, messages, sampling):
        yield HOSTILE[:6]
        yield HOSTILE[6:]

    def count(self, messages):
        return 1

    def tokens(self, text):
        return 3

    def info(self):
        return "model \x1b]0;pwned\x07x at http://127.0.0.1:1/v1"


def test_terminal_safe_escapes_controls_but_tab_and_newline():
    assert terminal_safe("a\tb\nc") == "a\tb\nc"
    assert terminal_safe("\x1b[2J\r\x07\x7f\x9b") == "\\x1b[2J\\x0d\\x07\\x7f\\x9b"
    assert terminal_safe("héllo ✓") == "héllo ✓"  # printable non-ASCII stays


def test_a_hostile_reply_reaches_the_terminal_escaped_and_the_file_as_it_came(tmp_path):
    out = io.StringIO()
    session = ChatSession(ScriptedBackend(), {"max_new_tokens": 8}, out=out, interactive=True)
    reply = session.reply("hi")
    session.command("/history")
    session.command("/info")
    printed = out.getvalue()
    assert "\x1b]" not in printed and "\x07" not in printed and "\r" not in printed and "\x9b" not in printed
    assert "\\x1b]52;c;ZXZpbA==\\x07" in printed and "\\x1b]0;pwned" in printed
    assert reply == HOSTILE.strip()
    session.command(f"/save {tmp_path / 'c.jsonl'}")
    saved = json.loads((tmp_path / "c.jsonl").read_text(encoding="utf-8"))
    assert saved["messages"][-1]["content"] == HOSTILE.strip()
