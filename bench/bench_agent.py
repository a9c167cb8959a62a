"""Tool calls of a trained ``bark-agent`` model over a real ``barkgpt serve`` (issue 15's acceptance).

On ``--requests`` held-out requests (``barkgpt.bark``'s eval cases, which training never
generates), sent with the real ``openai`` client: under ``tool_choice: "auto"`` (greedy) the share
with the right tool and arguments; under ``"required"`` (greedy and at temperature 1) the share of
replies that are valid calls of a listed tool whose arguments fit its schema.

    barkgpt train --preset bark-agent --out-dir runs/bark-agent
    python bench/bench_agent.py --model runs/bark-agent [--requests 100]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a trained bark-agent run folder")
    ap.add_argument("--requests", type=int, default=100)
    args = ap.parse_args()
    import openai
    from test_server import KEY, launch, stop, wait_ready

    import barkgpt.bark as B

    proc, base = launch(Path(args.model), "bark-agent")
    try:
        wait_ready(proc, base)
        client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
        rng = random.Random("bark-agent-eval:0")
        counts = {"auto_right": 0, "required_valid_greedy": 0, "required_valid_t1": 0}
        for i in range(args.requests):
            messages, tools, req = B._agent_case(rng, i)
            expected = {"name": req["name"], "arguments": req["arguments"]}
            for key, choice, temperature in (
                ("auto_right", "auto", 0.0),
                ("required_valid_greedy", "required", 0.0),
                ("required_valid_t1", "required", 1.0),
            ):
                r = client.chat.completions.create(
                    model="bark-agent", messages=messages, tools=tools, tool_choice=choice,
                    temperature=temperature, seed=i, max_tokens=64,
                )  # fmt: skip
                calls = [
                    {"name": c.function.name, "arguments": json.loads(c.function.arguments)}
                    for c in r.choices[0].message.tool_calls or []
                ]
                if key == "auto_right":
                    counts[key] += calls == [expected]
                else:
                    counts[key] += bool(calls) and all(B.valid_agent_call(c, tools) for c in calls)
        print(json.dumps({"requests": args.requests, **counts}, indent=1))
    finally:
        stop(proc)


if __name__ == "__main__":
    main()
