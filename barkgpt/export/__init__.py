"""Exports and imports at the boundary with other tools.

- :mod:`barkgpt.export.hf`: a Hugging Face folder (``LlamaForCausalLM`` / ``GPT2LMHeadModel``,
  loadable without ``trust_remote_code``), and the reverse import of a local GPT-2 or Llama folder.
- :mod:`barkgpt.export.gguf`: a GGUF file for llama.cpp, written with the ``gguf`` package.

Both read a checkpoint folder (:mod:`barkgpt.checkpoint`) and write their output atomically:
an existing target is refused unless ``force``, and a failure leaves nothing half-written.
"""
