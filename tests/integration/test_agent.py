"""A LangGraph ReAct agent over a real ``barkgpt serve`` of a trained ``bark-agent`` model.

LangGraph's prebuilt agent (``create_react_agent``) drives LangChain's ``ChatOpenAI`` against the
server with real Python tools: the model must call the right tool with the right arguments
(``tool_choice`` auto, free decoding), the agent runs it, sends the result back as a ``tool``
message, and the model answers in words. The model is the preset itself, trained once per
session by conftest's ``bark_agent_run`` (about 2.5 minutes on 2 idle cores), so the test is ``slow``.
"""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("langgraph")
pytest.importorskip("langchain_openai")
from test_server import KEY, launch, stop, wait_ready

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "bark-agent"


@pytest.fixture(scope="module")
def base_url(bark_agent_run):
    proc, base = launch(bark_agent_run, MODEL)
    wait_ready(proc, base)
    yield base
    stop(proc)


def make_tools(ran: list):
    """The dog's tools as real Python functions; their schemas are the preset's ``AGENT_TOOLS``."""
    from langchain_core.tools import tool

    @tool
    def fetch(item: str) -> str:
        """Fetch an item and bring it back."""
        ran.append(("fetch", item))
        return json.dumps({"item": item, "found": True})

    @tool
    def bark(times: int) -> str:
        """Bark a number of times."""
        ran.append(("bark", times))
        return json.dumps({"sound": " ".join(["woof"] * times)})

    @tool
    def weather(city: str) -> str:
        """Get the weather in a city."""
        ran.append(("weather", city))
        return json.dumps({"city": city, "sky": "sunny", "temperature_c": 21})

    return [fetch, bark, weather]


def test_tools_match_the_training_schemas():
    """What LangChain sends for the Python tools is what the model was trained on."""
    from langchain_core.utils.function_calling import convert_to_openai_tool

    from barkgpt.bark import AGENT_TOOLS

    assert [convert_to_openai_tool(t) for t in make_tools([])] == list(AGENT_TOOLS)


@pytest.mark.filterwarnings("ignore:create_react_agent has been moved")  # the brief's prebuilt agent, still in LangGraph 1.x
@pytest.mark.parametrize(
    "request_text, call", [("fetch the ball", ("fetch", "ball")), ("What is the weather like in Tokyo?", ("weather", "Tokyo"))]
)
def test_react_agent_completes_a_tool_round_trip(base_url, request_text, call):
    """One round trip: the model calls the right tool with the right arguments (as LangChain
    parsed them from the server's ``tool_calls``), the agent runs the Python function and sends
    its result back, and the model answers in words from it. Both requests are from the
    held-out share the model never trained on."""
    from langchain_core.messages import AIMessage, ToolMessage
    from langchain_openai import ChatOpenAI
    from langgraph.prebuilt import create_react_agent

    from barkgpt.bark import AGENT_TOOLS, valid_agent_call

    ran: list = []
    llm = ChatOpenAI(base_url=base_url + "/v1", api_key=KEY, model=MODEL, temperature=0, max_tokens=64, max_retries=0)
    agent = create_react_agent(llm, tools=make_tools(ran))
    state = agent.invoke({"messages": [("user", request_text)]}, {"recursion_limit": 6})
    messages = state["messages"]
    first = messages[1]
    assert isinstance(first, AIMessage) and len(first.tool_calls) == 1, messages
    (made,) = first.tool_calls
    assert valid_agent_call({"name": made["name"], "arguments": made["args"]}, list(AGENT_TOOLS))
    assert re.fullmatch(r"call_[0-9A-Za-z]{24}", made["id"])
    assert ran == [call]  # the agent ran the real tool with the model's (right) arguments
    assert isinstance(messages[2], ToolMessage) and messages[2].tool_call_id == made["id"]
    last = messages[-1]
    assert len(messages) == 4 and isinstance(last, AIMessage) and not last.tool_calls, messages  # then words
    assert call[1] in last.content and "<tool_call>" not in last.content, last.content
