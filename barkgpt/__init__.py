"""BarkGPT: train a small GPT from raw text, then generate, chat, serve and export it.

The package root stays light (no torch import) so that ``barkgpt --help`` answers fast; the
heavy parts live in their own modules. ``barkgpt.load`` is the one convenience entry point.
"""

__version__ = "0.1.0"


def load(path, device="auto", compile=False):
    """Load a trained run or checkpoint folder for generation.

    Args:
        path: a run folder (``runs/x``, its ``best/`` or ``last/`` checkpoint is used) or a
            checkpoint folder holding ``model.safetensors`` and ``config.json``.
        device: ``auto|cpu|cuda|cuda:N|mps``.
        compile: ``torch.compile`` the decode step: ~3x tokens/s at batch 1 on CPU after a
            one-time compile of 5-20 s (see :class:`barkgpt.engine.Engine`).

    Returns:
        A :class:`barkgpt.generate.TextGenerator` with ``generate(prompt, ...) -> str``.

    Raises:
        BarkError: the folder holds no checkpoint, or the checkpoint is corrupt.
    """
    from barkgpt.generate import load_generator

    return load_generator(path, device=device, compile=compile)
