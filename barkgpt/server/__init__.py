"""The OpenAI-compatible HTTP server: ``app`` (wiring), ``serving`` and ``streaming`` (the routes
and their responses), ``host``, ``scheduler`` (continuous batching), ``protocol`` and
``native_protocol`` (schemas), ``security``, ``errors``, ``metrics``, ``web``, ``runs`` and
``runfiles``. Needs the ``serve`` extra; nothing here is imported by the core."""
