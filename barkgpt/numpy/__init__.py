"""The NumPy backend: the same GPT as :mod:`barkgpt.model`, in NumPy alone, with every backward
pass written by hand (``barkgpt train --backend numpy``; ``sample``, ``chat`` and ``eval``'s rule check take
``--backend numpy`` too).

It shares the config (:mod:`barkgpt.config`), tokenizer, data pipeline and checkpoint format
with the PyTorch backend: a NumPy-trained run folder samples, serves and exports like any other,
and a PyTorch-trained checkpoint runs here. Nothing in this subpackage imports torch.

- :mod:`.layers`: each layer's ``forward`` and ``backward`` (the gradient derived in its docstring);
- :mod:`.model`: :class:`~.model.GPT` over those layers, with the torch model's tensor names;
- :mod:`.optim`: AdamW, warmup + cosine, gradient clipping;
- :mod:`.train`: the training loop, checkpoints and exact resume;
- :mod:`.generate`: KV-cache decoding, sampling, and ``load_generator``.
"""
