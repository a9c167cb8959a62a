"""The web UI of ``barkgpt serve``: one page, ``index.html``, whose chat view is at ``/`` and whose
training view is at ``/train``, its scripts and style (``/static/*``, shipped in
``server/static/``: no CDN, no build step), and the JSON routes the training view reads.

The chat view speaks only the public ``/v1/chat/completions`` (streaming) and ``/v1/models``, so
it works against any OpenAI-compatible server. The training view reads the run folders under
``barkgpt serve --runs DIR`` and may train one run at a time, through
:class:`~barkgpt.server.runs.TrainingRuns`:

    GET  /v1/presets             the presets a run can start from, with their settings
    GET  /v1/runs                the runs: name, status, step, losses, tokens/s, ETA
    GET  /v1/runs/{name}         one run: that summary, metrics rows, config, samples, checkpoints, log
    POST /v1/runs                start a run from a preset with a few overrides (409 while one trains)
    POST /v1/runs/{name}/stop    SIGINT the run's process: it saves ``last/`` and exits
    POST /v1/runs/{name}/load    serve the run's checkpoint (``best/``, else ``last/``) as model ``name``

The pages and static files are public (they hold no data); the ``/v1`` routes need the API key
when one is set. What a run name may be, which files a run may read and which data it may train
on is :mod:`barkgpt.server.runs`'s to say.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from barkgpt.generate import load_generator
from barkgpt.server.errors import ApiError
from barkgpt.server.host import ModelHost
from barkgpt.server.native_protocol import StartRunRequest
from barkgpt.server.runfiles import checkpoint_infos
from barkgpt.server.runs import OVERRIDES, TrainingRuns, list_presets

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_PREFIX = "/static/"
PAGES = ("/", "/train")  # both send index.html, which shows the chat or the training view by its path


def add_routes(app: FastAPI, host: ModelHost, runs: TrainingRuns) -> None:
    """Add the pages, ``/static``, and the run routes to ``app``.

    Args:
        app: the app of :func:`barkgpt.server.app.create_app`.
        host: its :class:`~barkgpt.server.host.ModelHost` (``/load`` attaches a run's model to it).
        runs: the runs folder and its training process.
    """
    for route in PAGES:
        app.add_api_route(route, page, methods=["GET"], include_in_schema=False)
    app.mount(STATIC_PREFIX.rstrip("/"), StaticFiles(directory=STATIC_DIR), name="static")
    load_lock = asyncio.Lock()

    @app.get("/v1/presets")
    def presets():
        """The presets a run can start from, with their settings."""
        return {"object": "list", "data": list_presets(), "overrides": list(OVERRIDES)}

    @app.get("/v1/runs")
    def list_runs():
        """The runs under ``--runs``, most recently changed first."""
        return runs.list_runs()

    @app.get("/v1/runs/{name}")
    def get_run(name: str):
        """One run: summary, metrics rows, resolved config, latest samples, checkpoints, log tail."""
        return runs.detail(name)

    @app.post("/v1/runs", status_code=201)
    def start_run(body: StartRunRequest):
        """Start ``barkgpt train --preset P --out-dir RUNS/NAME`` with the overrides (one run at a time)."""
        return runs.start(body)

    @app.post("/v1/runs/{name}/stop")
    def stop_run(name: str):
        """Ask the run's process to stop (SIGINT): it saves ``last/`` and exits."""
        return runs.stop(name)

    @app.post("/v1/runs/{name}/load")
    async def load_run(name: str):
        """Serve the run's ``best/`` (else ``last/``) checkpoint from now on, as model id ``name``."""
        path = runs.folder(name)
        gen, _ = host.ready()  # 503 while the first model loads or the server stops
        checkpoints = checkpoint_infos(path, runs.root)  # best/ first, as load_generator picks
        if not checkpoints:
            raise ApiError(409, f"the run '{name}' has no checkpoint yet; wait for its first evaluation", code="no_checkpoint")
        device = str(next(gen.model.parameters()).device)
        async with load_lock:  # the folder checked above, resolved: nothing else is read
            new = await asyncio.to_thread(load_generator, (path / checkpoints[0]["name"]).resolve(), device)
            await asyncio.to_thread(host.attach, new, name)  # compiles the decode step: off the event loop
        return {"model": name, "max_model_len": new.block_size}


async def page():
    """The web page, ``index.html`` (revalidated on each visit, so an upgrade shows at once)."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})
