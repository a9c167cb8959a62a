"""The OpenAI-compatible HTTP server: ``protocol`` (schemas), ``scheduler`` (continuous batching),
``app`` (routes). Needs the ``serve`` extra; nothing here is imported by the core."""
