"""Grammar libraries side by side on our tokenizers: ``llguidance`` against ``xgrammar``.

For a byte-level BPE of 2048 tokens trained by barkgpt on tiny Shakespeare and a char tokenizer
over printable ASCII, it measures (ms, median over repeats, one thread):

* ``compile_ms``: building the constraint of each of a few JSON schemas (a fresh compile each
  time, no cache);
* ``mask_us``: computing one next-token mask while walking a fixed valid JSON instance token
  by token (the per-token cost a decode step pays), plus advancing the matcher.

This is how ``barkgpt/structured.py`` picked its library (issue 15). Both libraries must be
installed (``pip install llguidance xgrammar``); one missing is skipped.

    python bench/bench_grammar.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import string
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
        "required": ["name", "age"],
    },
    "order": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}},
                    "required": ["sku", "qty"],
                },
                "minItems": 1,
                "maxItems": 5,
            },
            "status": {"enum": ["new", "paid", "shipped"]},
            "note": {"type": "string"},
        },
        "required": ["id", "items", "status"],
    },
    "nested": {
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {"b": {"type": "object", "properties": {"c": {"type": "number"}}}}},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}},
            "ok": {"type": "boolean"},
        },
        "required": ["a", "ok"],
    },
}
INSTANCES = {
    "person": {"name": "Romeo Montague", "age": 17},
    "order": {"id": 42, "items": [{"sku": "ab-1", "qty": 2}, {"sku": "cd", "qty": 1}], "status": "paid"},
    "nested": {"a": {"b": {"c": 3.25}}, "tags": ["x", "yy"], "ok": True},
}


def tokenizers():
    """(name, barkgpt Tokenizer) pairs: BPE 2048 on tiny Shakespeare, char over printable ASCII."""
    from barkgpt.tokenizer import Tokenizer

    text = (REPO.parent / "shared" / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    bpe = Tokenizer.train("bpe", iter([text]), vocab_size=2048)
    char = Tokenizer.train("char", iter([string.printable + text[:10000]]))
    return [("bpe2048", bpe), ("char", char)]


def llg_case(tok, schema: dict, ids: list[int]):
    """(compile seconds, [mask+advance seconds per token]) with llguidance."""
    import llguidance
    import llguidance.torch as lt

    from barkgpt.structured import JSON_OPTIONS, ll_tokenizer

    llt = ll_tokenizer(tok)
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
    m = llguidance.LLMatcher(llt, grammar, log_level=0)
    m.compute_bitmask()  # the first mask, part of getting ready
    m.reset()
    compile_s = time.perf_counter() - t0
    bitmask = lt.allocate_token_bitmask(1, tok.vocab_size)
    steps = []
    for t in ids:
        t0 = time.perf_counter()
        lt.fill_next_token_bitmask(m, bitmask, 0)
        ok = m.consume_token(t)
        steps.append(time.perf_counter() - t0)
        assert ok, m.get_error()
    return compile_s, steps


def xgr_case(tok, schema: dict, ids: list[int]):
    """(compile seconds, [mask+advance seconds per token]) with xgrammar."""
    import xgrammar as xgr

    special = {tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id}
    vocab = [b"" if i in special else tok.id_to_bytes(i) for i in range(tok.vocab_size)]
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=tok.vocab_size, stop_token_ids=[tok.eos_id])
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "))
    m = xgr.GrammarMatcher(compiled)
    compile_s = time.perf_counter() - t0
    bitmask = xgr.allocate_token_bitmask(1, tok.vocab_size)
    steps = []
    for t in ids:
        t0 = time.perf_counter()
        m.fill_next_token_bitmask(bitmask)
        ok = m.accept_token(t)
        steps.append(time.perf_counter() - t0)
        assert ok
    return compile_s, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    libs = []
    for name, fn, mod in (("llguidance", llg_case, "llguidance"), ("xgrammar", xgr_case, "xgrammar")):
        try:
            __import__(mod)
            libs.append((name, fn))
        except ImportError:
            print(f"{name}: not installed, skipped")
    results = []
    for tname, tok in tokenizers():
        for sname, schema in SCHEMAS.items():
            ids = tok.encode(json.dumps(INSTANCES[sname]))  # ", " and ": ", as both are told to write
            for lname, fn in libs:
                runs = [fn(tok, schema, ids) for _ in range(args.repeats)]
                compile_ms = statistics.median(r[0] for r in runs) * 1e3
                mask_us = statistics.median(statistics.median(r[1]) for r in runs) * 1e6
                results.append(
                    {
                        "tokenizer": tname,
                        "schema": sname,
                        "lib": lname,
                        "compile_ms": round(compile_ms, 2),
                        "mask_us": round(mask_us, 1),
                    }
                )
                print(json.dumps(results[-1]))


if __name__ == "__main__":
    main()
