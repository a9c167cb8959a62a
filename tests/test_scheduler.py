"""The continuous-batching scheduler: batched rows match the engine alone, cancel frees rows, limits."""

import asyncio

import pytest
import torch

from barkgpt.common import BarkError
from barkgpt.config import SamplingParams
from barkgpt.engine import Engine, KVCache
from barkgpt.model import GPT
from barkgpt.server.scheduler import QueueFull, Scheduler


@pytest.fixture
def model(tiny_config):
    torch.manual_seed(0)
    return GPT(tiny_config).eval()


def run(scheduler, coro):
    async def main():
        scheduler.start()
        try:
            return await asyncio.wait_for(coro(), timeout=20)
        finally:
            scheduler.stop()

    return asyncio.run(main())


async def collect(req):
    return [t async for t in req]


def test_copy_row_and_narrow_share_storage(model):
    one = KVCache.for_model(model, 1)
    model(torch.tensor([[1, 2, 3]]), kv_cache=one)
    big = KVCache.for_model(model, 3)
    big.copy_row(2, one)
    assert big.lengths == [0, 0, 3] and torch.equal(big.k[:, 2, :, :3], one.k[:, 0, :, :3])
    view = big.narrow(3)
    view.k[0, 2, 0, 5, 0] = 7.0
    assert big.k[0, 2, 0, 5, 0] == 7.0 and view.lengths == [0, 0, 3]


def test_concurrent_greedy_requests_match_the_engine_alone(model):
    """Rows join at different times and positions; each still gets the tokens it gets alone."""
    prompts = [[1, 2, 3], [5] * 9, [7, 8], [9]]
    engine = Engine(model)
    alone = [[s[0] for s in engine.generate(p, max_new_tokens=8, temperature=0)] for p in prompts]
    sched = Scheduler(Engine(model), stop_ids=[], max_batch_size=3)  # fewer rows than requests: some wait

    async def go():
        reqs = [sched.submit(p, SamplingParams(max_new_tokens=8, temperature=0)) for p in prompts]
        return await asyncio.gather(*(collect(r) for r in reqs))

    assert run(sched, go) == alone


def test_seeded_sampling_is_reproducible_among_other_requests(model):
    sched = Scheduler(Engine(model), stop_ids=[])
    p = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=20, seed=123)

    async def go():
        first = await collect(sched.submit([1, 2], p))
        others = [sched.submit([3, 4, 5], SamplingParams(max_new_tokens=10, seed=i)) for i in range(4)]
        again = sched.submit([1, 2], p)
        out = await asyncio.gather(collect(again), *(collect(r) for r in others))
        return first, out[0]

    first, again = run(sched, go)
    assert first == again


def test_stop_id_ends_a_request_and_cancel_frees_its_row(model):
    sched = Scheduler(Engine(model), stop_ids=[], max_batch_size=2)

    async def go():
        long = sched.submit([1], SamplingParams(max_new_tokens=30, temperature=0))
        await long.__anext__()
        long.cancel()
        short = sched.submit([2], SamplingParams(max_new_tokens=3, temperature=0))
        got = await collect(short)
        rest = await collect(long)  # ends early: the row was freed
        return got, rest

    got, rest = run(sched, go)
    assert len(got) == 3 and len(rest) < 29
    assert sched.running == 0

    first = [s[0] for s in Engine(model).generate([1], max_new_tokens=1, temperature=0)][0]
    sched = Scheduler(Engine(model), stop_ids=[first])
    out = run(sched, lambda: collect(sched.submit([1], SamplingParams(max_new_tokens=10, temperature=0))))
    assert out == [first]  # the stop id is sent, then the request ends


def test_limits(model):
    sched = Scheduler(Engine(model), stop_ids=[], max_queue=1)

    async def go():  # the worker is not started: requests stay queued
        with pytest.raises(BarkError, match="30 tokens and max_new_tokens is 5"):
            sched.submit(list(range(30)), SamplingParams(max_new_tokens=5))
        sched.submit([1], SamplingParams(max_new_tokens=5))
        with pytest.raises(QueueFull):
            sched.submit([1], SamplingParams(max_new_tokens=5))

    asyncio.run(go())


def test_same_prompt_is_prefilled_once_and_each_copy_samples_alone(model):
    """The n choices of one request (queued together) share one prefill; each still gets the
    tokens its seed gives it alone."""
    prefills = []
    hook = model.register_forward_pre_hook(lambda m, args: prefills.append(1) if args[0].size(1) > 1 else None)
    prompt, seeds = [1, 2, 3, 4], [11, 12, 13]
    try:
        sched = Scheduler(Engine(model), stop_ids=[])

        async def together():
            reqs = [sched.submit(prompt, SamplingParams(max_new_tokens=6, seed=s)) for s in seeds]
            return await asyncio.gather(*(collect(r) for r in reqs))

        shared = run(sched, together)
        n_prefills = len(prefills)
        sched = Scheduler(Engine(model), stop_ids=[], max_batch_size=2)  # the third copy waits for a free row
        prefills.clear()
        assert run(sched, together) == shared and len(prefills) == 2
        sched = Scheduler(Engine(model), stop_ids=[])
        alone = run(
            sched,
            lambda: asyncio.gather(*[collect(sched.submit(prompt, SamplingParams(max_new_tokens=6, seed=s))) for s in seeds[:1]]),
        )
    finally:
        hook.remove()
    assert n_prefills == 1
    assert shared[0] == alone[0] and len({tuple(t) for t in shared}) > 1


def test_a_prompt_in_the_prefix_cache_runs_no_forward_pass_of_its_own(model):
    """Admission prefills all but the last prompt token, which rides the next decode step: a
    prompt cached up to its last token (here: asked again) and a one-token prompt run nothing
    on the prefill cache, and still get the tokens they get alone."""
    prompt = [1, 2, 3, 4, 5]
    sched = Scheduler(Engine(model, prefix_cache_bytes=1 << 20), stop_ids=[])
    prefilled = []  # tokens run on the scheduler's one-row prefill cache, per forward pass

    def hook(m, args, kwargs):
        if kwargs.get("kv_cache") is not None and kwargs["kv_cache"].k is sched._prefill_cache.k:
            prefilled.append(args[0].size(1))

    alone = {tuple(p): [s[0] for s in Engine(model).generate(p, max_new_tokens=6, temperature=0)] for p in (prompt, [9])}
    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:

        async def go():
            greedy = SamplingParams(max_new_tokens=6, temperature=0)
            first = await collect(sched.submit(prompt, greedy))
            runs = list(prefilled)
            again = await collect(sched.submit(prompt, greedy))
            one = await collect(sched.submit([9], greedy))
            return first, runs, again, one

        first, runs, again, one = run(sched, go)
    finally:
        handle.remove()
    assert runs == [4] and prefilled == [4]  # 4 of 5 tokens the first time, nothing after
    assert first == again == alone[tuple(prompt)] and one == alone[(9,)]


def test_logprobs_only_for_requests_that_ask(model):
    sched = Scheduler(Engine(model), stop_ids=[])

    async def go():
        asked = sched.submit([1, 2], SamplingParams(max_new_tokens=5, temperature=0, logprobs=3))
        plain = sched.submit([1, 2], SamplingParams(max_new_tokens=5, temperature=0))
        tokens = await collect(asked)
        await collect(plain)
        return tokens, asked.logprobs, plain.logprobs

    tokens, logprobs, none = run(sched, go)
    assert none == [] and len(logprobs) == len(tokens) == 5
    for t, (lp, top) in zip(tokens, logprobs):
        assert len(top) == 3 and top[0] == (t, lp) and lp <= 0  # greedy: the chosen token is the top one


def test_compiled_step_serves_joining_and_leaving_rows_without_recompiling(model):
    """The scheduler decodes through the engine's compiled step: warmed up for every batch bucket
    at start, it compiles nothing more while rows join and leave, and each request still gets
    the eager engine's tokens alone."""
    from torch._dynamo.utils import counters

    prompts = [[1, 2, 3], [5] * 9, [7, 8], [9], [4, 4]]
    lengths = [8, 3, 12, 5, 7]  # rows finish at different steps: batch sizes 3, 2, 1 all come up
    engine = Engine(model)
    alone = [[s[0] for s in engine.generate(p, max_new_tokens=n, temperature=0)] for p, n in zip(prompts, lengths)]
    sched = Scheduler(Engine(model, compile=True), stop_ids=[], max_batch_size=3)

    async def go():
        compiled = sum(counters["stats"].values()), dict(counters["frames"])
        reqs = [sched.submit(p, SamplingParams(max_new_tokens=n, temperature=0)) for p, n in zip(prompts, lengths)]
        out = await asyncio.gather(*(collect(r) for r in reqs))
        return out, compiled

    out, before = run(sched, go)  # run() starts the scheduler: the warm-up compiles inside
    assert out == alone
    assert sched.engine.compile and sched.engine._compiled_ok  # the compiled path really ran
    assert (sum(counters["stats"].values()), dict(counters["frames"])) == before  # no compile after the warm-up


def test_prefix_cache_reuses_a_previous_turn_and_changes_no_token(model):
    """Turn 2's prompt starts with turn 1's prompt and reply: the cache serves those positions,
    and the tokens equal those without a cache, greedy and seeded."""

    def chat(engine):
        sched = Scheduler(engine, stop_ids=[])

        async def go():
            replies = []
            for params in (SamplingParams(max_new_tokens=6, temperature=0), SamplingParams(max_new_tokens=6, seed=4)):
                first = [1, 2, 3, 4]
                reply = await collect(sched.submit(first, params))
                second = first + reply + [5, 6]
                replies += [reply, await collect(sched.submit(second, params))]
                replies.append(await collect(sched.submit(second[:7] + [9], params)))  # a shorter shared prefix
            return replies

        return run(sched, go)

    cached_engine = Engine(model, prefix_cache_bytes=1 << 20)
    assert chat(cached_engine) == chat(Engine(model))
    assert cached_engine.prefix_cache.hits >= 2 * (4 + 5) + 2 * 7


class CountingLoop(asyncio.SelectorEventLoop):
    """A real event loop that counts its thread-safe wake-ups."""

    def __init__(self):
        super().__init__()
        self.wakeups = 0

    def call_soon_threadsafe(self, *args, **kwargs):
        self.wakeups += 1
        return super().call_soon_threadsafe(*args, **kwargs)


def test_steps_sent_while_the_loop_is_busy_wake_it_once_and_arrive_together():
    """A worker that runs ahead of a busy event loop adds to the pending hand-off instead of
    waking the loop per step; the request then takes every ready token at once, the end last."""
    import threading

    from barkgpt.server.handoff import send as _send
    from barkgpt.server.scheduler import Request

    loop = CountingLoop()
    try:

        async def go():
            req = Request([1], SamplingParams(max_new_tokens=4), asyncio.get_running_loop())

            def worker():  # four decode steps and the end, while the loop is not running callbacks
                for item in (5, 6, 7, 8, None):
                    _send([(req, item)])

            t = threading.Thread(target=worker)
            t.start()
            t.join()  # blocks the loop until the worker is done
            first = await req.__anext__()
            ready = req.ready()
            rest = [x async for x in req]
            return first, ready, rest

        assert loop.run_until_complete(go()) == (5, [6, 7, 8], [])
        assert loop.wakeups == 1
    finally:
        loop.close()


def test_a_steps_tokens_wait_for_the_stream_interval_then_flush_sends_them(monkeypatch):
    """At one stream a decode step is shorter than the stream interval: a step's tokens sent with
    ``hold`` soon after a wake-up wait (no wake-up), and the worker's ``flush`` sends them; an
    end or error (sent without ``hold``) goes at once."""
    from barkgpt.server import handoff
    from barkgpt.server.scheduler import Request

    monkeypatch.setattr(handoff, "STREAM_INTERVAL_S", 60.0)  # "soon after" even on a slow machine

    loop = CountingLoop()
    try:

        async def go():
            req = Request([1], SamplingParams(max_new_tokens=4), asyncio.get_running_loop())
            handoff.send([(req, 5)], hold=True)  # the first wake-up of this loop: at once
            assert await req.__anext__() == 5 and loop.wakeups == 1
            handoff.send([(req, 6)], hold=True)  # within the interval of that wake-up: held
            await asyncio.sleep(0)
            assert req.ready() == [] and loop.wakeups == 1
            handoff.flush()  # still within the interval: stays held
            assert loop.wakeups == 1
            handoff.flush(force=True)  # the worker goes idle: sent
            assert await req.__anext__() == 6 and loop.wakeups == 2
            handoff.send([(req, None)])  # the end: never held
            return [x async for x in req], loop.wakeups

        assert loop.run_until_complete(go()) == ([], 3)
    finally:
        loop.close()


def test_first_tokens_and_ends_are_not_held_for_the_stream_interval(model, monkeypatch):
    """With a stream interval far longer than the test, a second request's first token and a
    short request's end still arrive while a long request decodes: only middle tokens wait."""
    from barkgpt.server import handoff

    monkeypatch.setattr(handoff, "STREAM_INTERVAL_S", 60.0)
    sched = Scheduler(Engine(model), stop_ids=[], max_batch_size=4)

    async def go():
        long = sched.submit([1, 2, 3], SamplingParams(max_new_tokens=28, temperature=0))
        assert isinstance(await long.__anext__(), int)  # the first token of the first request
        short = sched.submit([4, 5], SamplingParams(max_new_tokens=3, temperature=0))
        got = await collect(short)  # its first token and its end, while `long` still runs
        running = sched.running == 1  # `long` has not finished: the end above was not waiting on it
        long.cancel()
        return got, running

    got, running = run(sched, go)
    assert len(got) == 3 and running
