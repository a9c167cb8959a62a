"""Constrained decoding (barkgpt/structured.py): grammar processors walked with random logits
standing in for a model, the compile cache, forced EOS, the typeability check, bounds, logit_bias,
the tool-call trigger and parser, and the engine and TextGenerator paths with a tiny real GPT."""

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from barkgpt.common import BarkError
from barkgpt.config import GPTConfig, SamplingParams
from barkgpt.engine import Engine, Row
from barkgpt.structured import (
    MAX_CHOICES,
    MAX_SCHEMA_DEPTH,
    Constraint,
    GrammarProcessor,
    LogitBias,
    ToolCallTrigger,
    close_objects,
    compile_constraint,
    processors_for,
)
from barkgpt.tokenizer import SPECIAL_TOKENS, Tokenizer

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        "pet": {"type": "object", "properties": {"kind": {"enum": ["dog", "cat"]}}, "required": ["kind"]},
    },
    "required": ["name", "age"],
}
TOOLS = [
    {"type": "function", "function": {"name": "fetch", "parameters": PERSON["properties"]["pet"]}},
    {
        "type": "function",
        "function": {
            "name": "bark",
            "parameters": {
                "type": "object",
                "properties": {"times": {"type": "integer", "minimum": 1, "maximum": 5}},
                "required": ["times"],
            },
        },
    },
]


def walk(tok, hooks, seed=0, max_steps=300, prefix=()):
    """Sample greedily from random logits through ``hooks`` until EOS; returns (text, finished)."""
    g = torch.Generator().manual_seed(seed)
    row = Row([tok.eos_id], SamplingParams(temperature=0))
    row.generated.extend(prefix)
    for _ in range(max_steps):
        logits = torch.randn(tok.vocab_size, generator=g)
        for h in hooks:
            logits = h(row, logits)
        t = int(logits.argmax())
        if t == tok.eos_id:
            return tok.decode(row.generated), True
        row.generated.append(t)
    return tok.decode(row.generated), False


@pytest.mark.parametrize("seed", range(3))
def test_json_schema_walks_give_valid_json(tiny_tokenizer, seed):
    text, finished = walk(
        tiny_tokenizer, [GrammarProcessor(compile_constraint(tiny_tokenizer, Constraint.json_schema(PERSON)))], seed
    )
    assert finished
    jsonschema.validate(json.loads(text), PERSON)
    assert set(json.loads(text)) <= set(PERSON["properties"])  # objects are closed (strict, as xgrammar's)


def test_choice_regex_and_grammar(tiny_tokenizer):
    text, _ = walk(tiny_tokenizer, processors_for(tiny_tokenizer, Constraint.choice(["yes", "no", "maybe so"])))
    assert text in ("yes", "no", "maybe so")
    text, _ = walk(tiny_tokenizer, processors_for(tiny_tokenizer, Constraint.regex(r"[0-9]{3}-[a-z]{2}")))
    assert len(text) == 6 and text[:3].isdigit() and text[3] == "-"
    for pattern in (r"[0-9]/[0-9]", r"[0-9]\/[0-9]"):  # a slash, escaped or not, is a slash (not the end of the literal)
        text, _ = walk(tiny_tokenizer, processors_for(tiny_tokenizer, Constraint.regex(pattern)))
        assert len(text) == 3 and text[1] == "/"
    text, _ = walk(tiny_tokenizer, processors_for(tiny_tokenizer, Constraint.grammar('start: "(" NUM ")"\nNUM: /[0-9]{1,2}/')))
    assert text.startswith("(") and text.endswith(")") and text[1:-1].isdigit()


def test_eos_is_forced_once_the_grammar_is_complete(tiny_tokenizer):
    hook = GrammarProcessor(compile_constraint(tiny_tokenizer, Constraint.choice(["yes"])))
    row = Row([1], SamplingParams(temperature=0))
    row.generated.extend(tiny_tokenizer.encode("yes"))
    out = hook(row, torch.zeros(tiny_tokenizer.vocab_size))
    assert torch.isfinite(out).nonzero().view(-1).tolist() == [tiny_tokenizer.eos_id]
    assert hook.complete(row)


def test_one_processor_keeps_each_rows_state(tiny_tokenizer):
    hook = GrammarProcessor(compile_constraint(tiny_tokenizer, Constraint.choice(["ab", "cd"])))
    a, c = Row([1], SamplingParams()), Row([1], SamplingParams())
    a.generated.append(tiny_tokenizer.encode("a")[0])
    c.generated.append(tiny_tokenizer.encode("c")[0])
    ok_a = torch.isfinite(hook(a, torch.zeros(tiny_tokenizer.vocab_size)))
    ok_c = torch.isfinite(hook(c, torch.zeros(tiny_tokenizer.vocab_size)))
    assert ok_a[tiny_tokenizer.encode("b")[0]] and not ok_a[tiny_tokenizer.encode("d")[0]]
    assert ok_c[tiny_tokenizer.encode("d")[0]] and not ok_c[tiny_tokenizer.encode("b")[0]]


def test_compiles_are_cached_per_tokenizer_and_constraint(tiny_tokenizer, tiny_text):
    c = Constraint.json_schema(PERSON)
    assert compile_constraint(tiny_tokenizer, c) is compile_constraint(tiny_tokenizer, Constraint.json_schema(json.dumps(PERSON)))
    other = Tokenizer.train("bpe", iter([tiny_text]), vocab_size=280)
    assert compile_constraint(other, c) is not compile_constraint(tiny_tokenizer, c)
    assert compile_constraint(tiny_tokenizer, Constraint.json_object()) is not compile_constraint(tiny_tokenizer, c)


def test_a_vocabulary_that_cannot_write_the_output_is_refused():
    words = Tokenizer.from_words([*SPECIAL_TOKENS, "yes", "no", "very", "good"])
    with pytest.raises(BarkError, match=r"cannot write the requested json object.*'\{'"):
        compile_constraint(words, Constraint.json_object())
    text, _ = walk(words, processors_for(words, Constraint.choice(["very good", "no"])))  # words can write words
    assert text in ("very good", "no")
    chars = Tokenizer.train("char", iter(['abc {"x": 1'] * 3))  # has { and " but no }
    with pytest.raises(BarkError, match="cannot write"):
        compile_constraint(
            chars, Constraint.json_schema({"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]})
        )


def test_library_errors_and_bounds_are_one_line_bark_errors(tiny_tokenizer):
    for c, match in (
        (Constraint.json_schema({"type": "object", "properties": {"a": {"type": "strin"}}}), "Invalid type: strin"),
        (Constraint.regex("(a"), "unclosed group"),
        (Constraint.json_schema({"type": "string", "pattern": "(?=a)"}), "look-around"),
        (Constraint.grammar("start: foo"), "unknown name"),
    ):
        with pytest.raises(BarkError, match=match) as e:
            compile_constraint(tiny_tokenizer, c)
        assert "\n" not in str(e.value)
    deep: dict = {"type": "string"}
    for _ in range(MAX_SCHEMA_DEPTH):
        deep = {"type": "array", "items": deep}
    for make, arg in (
        (Constraint.json_schema, deep),
        (Constraint.json_schema, {"enum": ["x" * 100] * 400}),
        (Constraint.json_schema, "[1, 2]"),
        (Constraint.choice, ["a"] * (MAX_CHOICES + 1)),
        (Constraint.choice, []),
        (Constraint.regex, "a" * 5000),
        (Constraint.tool_calls, [{"type": "function", "function": {}}]),
    ):
        with pytest.raises(BarkError):
            make(arg)
    with pytest.raises(BarkError, match="not in tools"):
        Constraint.tool_calls(TOOLS, name="nope")


def test_close_objects_adds_additional_properties_false_only_where_missing():
    s = close_objects(
        {"type": "object", "properties": {"properties": {"type": "object", "properties": {}}}, "additionalProperties": True}
    )
    assert s["additionalProperties"] is True
    assert s["properties"]["properties"]["additionalProperties"] is False  # a property named "properties" is a subschema


def test_logit_bias_adds_and_bans(tiny_tokenizer):
    hook = LogitBias({"5": 2.5, 7: -100}, tiny_tokenizer.vocab_size)
    out = hook(Row([1], SamplingParams()), torch.zeros(tiny_tokenizer.vocab_size))
    assert out[5] == 2.5 and out[7] == float("-inf") and out[6] == 0
    for bad in ({"x": 1}, {"99999": 1}, {"5": 101}):
        with pytest.raises(BarkError, match="logit_bias"):
            LogitBias(bad, tiny_tokenizer.vocab_size)


def test_tool_calls_required_and_auto_trigger(tiny_tokenizer):
    from barkgpt.server.tools import parse_tool_calls

    one_call = tiny_tokenizer.encode('<tool_call>{"name": "bark", "arguments": {"times": 2}}</tool_call>')
    for parallel in (False, True):
        eos_bias = LogitBias({tiny_tokenizer.eos_id: 2.0}, tiny_tokenizer.vocab_size)  # random logits end sooner
        hooks = [eos_bias, *processors_for(tiny_tokenizer, Constraint.tool_calls(TOOLS, parallel=parallel))]
        text, finished = walk(tiny_tokenizer, hooks, seed=1)
        content, calls = parse_tool_calls(text)
        assert finished and content is None and calls and (parallel or len(calls) == 1)
        for call in calls:
            params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[call.function.name]
            jsonschema.validate(json.loads(call.function.arguments), params)
        row = Row([1], SamplingParams())
        row.generated.extend(one_call)
        allowed = torch.isfinite(hooks[1](row, torch.zeros(tiny_tokenizer.vocab_size))).nonzero().view(-1).tolist()
        assert (allowed == [tiny_tokenizer.eos_id]) == (not parallel)  # parallel: another <tool_call> may follow
    # auto: free text until the marker, even one that a token splits, then a valid call
    trigger = ToolCallTrigger(
        compile_constraint(tiny_tokenizer, Constraint.tool_calls(TOOLS, name="bark", parallel=False)), tiny_tokenizer
    )
    free = torch.zeros(tiny_tokenizer.vocab_size)
    row = Row([1], SamplingParams())
    assert torch.equal(trigger(row, free), free)
    text, finished = walk(tiny_tokenizer, [trigger], prefix=tiny_tokenizer.encode("Sure. <tool_call>{"))
    content, calls = parse_tool_calls(text)
    assert finished and content == "Sure." and [c.function.name for c in calls] == ["bark"]
    assert 1 <= json.loads(calls[0].function.arguments)["times"] <= 5


def test_tool_call_parser_streams_as_it_parses_whole():
    from barkgpt.server.tools import ToolCallParser, parse_tool_calls

    text = 'Hi <tool_c <tool_call>{"name": "bark", "arguments": {"times": 2}}</tool_call><tool_call>{"name": "x"}</tool_call><tool_call>{"na'
    content, calls = parse_tool_calls(text)
    assert content.startswith("Hi <tool_c") and content.endswith('<tool_call>{"na')
    assert [(c.function.name, c.function.arguments) for c in calls] == [("bark", '{"times": 2}'), ("x", "{}")]
    assert all(c.id.startswith("call_") and len(c.id) == 29 for c in calls)
    p = ToolCallParser()
    events = [e for ch in text for e in p.feed(ch)] + p.finish()
    assert [c.function.arguments for c in p.calls] == [c.function.arguments for c in calls]
    assert "".join(e for e in events if isinstance(e, str)).strip() == content


@pytest.fixture(scope="module")
def tiny_generator(tiny_tokenizer):
    from barkgpt.generate import TextGenerator
    from barkgpt.model import GPT

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tiny_tokenizer.vocab_size, block_size=96, n_layer=1, n_head=2, n_kv_head=1, n_embd=32))
    return TextGenerator(model, tiny_tokenizer)


def test_text_generator_writes_valid_json_and_leaves_the_default_path_alone(tiny_generator):
    small = {"type": "object", "properties": {"age": PERSON["properties"]["age"], "pet": PERSON["properties"]["pet"]}}
    outs = tiny_generator.complete(
        "A person:", constraint=Constraint.json_schema(small), max_new_tokens=40, temperature=1.0, seed=0, num_samples=2
    )
    for c in outs:  # each of the rows sharing one hook list keeps its own matcher
        jsonschema.validate(json.loads(c.text), small)
        assert c.finish_reason == "stop"
    cut = tiny_generator.complete("A person:", constraint=Constraint.json_schema(PERSON), max_new_tokens=3, temperature=0)[0]
    assert cut.finish_reason == "length"
    plain = tiny_generator.generate("A person:", max_new_tokens=20, temperature=0)
    ids = tiny_generator.encode_prompt("A person:")
    steps = list(Engine(tiny_generator.model).generate(ids, SamplingParams(max_new_tokens=20, temperature=0), stop_ids=[1]))
    assert tiny_generator.tokenizer.decode([s[0] for s in steps if s[0] != 1]) == plain  # no hooks: the engine's own tokens
    banned = tiny_generator.generate("A person:", max_new_tokens=20, temperature=0, logit_bias={str(steps[0][0]): -100})
    assert tiny_generator.tokenizer.encode(banned)[:1] != [steps[0][0]]


def test_sample_cli_flags(tiny_generator, tmp_path, capsys):
    from barkgpt.checkpoint import save_checkpoint
    from barkgpt.cli import main

    save_checkpoint(tmp_path / "m", tiny_generator.model, tiny_generator.tokenizer)
    base = ["sample", "--model", str(tmp_path / "m"), "--device", "cpu", "--prompt", "Q: ", "--max-new-tokens", "40"]
    main([*base, "--choice", "yes", "--choice", "no"])
    assert capsys.readouterr().out.strip() in ("Q: yes", "Q: no")
    (tmp_path / "s.json").write_text(
        json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]})
    )
    main([*base, "--json-schema", str(tmp_path / "s.json"), "--temperature", "0"])
    assert json.loads(capsys.readouterr().out.strip().removeprefix("Q: ")) in ({"ok": True}, {"ok": False})
    assert main([*base, "--regex", "(a"]) != 0
    assert "does not compile" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name",
    ["x" * 65, '</tool_call><tool_call>{"name"', "a b", "", "fetch/../x", 7],
)
def test_hostile_tool_names_are_refused(name):
    """A function name is written into the call's text: markup or odd characters in it would cut
    the call short when parsed, so only OpenAI's [A-Za-z0-9_-]{1,64} passes."""
    from barkgpt.structured import check_tools

    tool = {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(BarkError):
        check_tools([tool])


def test_a_repeated_tool_name_is_refused_and_a_plain_one_passes():
    from barkgpt.structured import check_tools

    tool = {"type": "function", "function": {"name": "get_weather-2", "parameters": {"type": "object", "properties": {}}}}
    assert len(check_tools([tool])) == 1
    with pytest.raises(BarkError):
        check_tools([tool, tool])
