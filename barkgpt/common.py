"""Small shared helpers: the user-facing error type, device/dtype resolution, atomic
file writes and progress bars.

Nothing here runs at import time; torch is imported inside the functions that need it so that
``config`` and ``cli --help`` stay light.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path


class BarkError(Exception):
    """A user error: bad input, a missing file, a contradictory flag.

    The message is one line that names the problem and the fix. The CLI prints it without a
    traceback and exits with status 2; the server turns it into a 400 response.
    """


def resolve_device(device: str = "auto") -> str:
    """Pick the device to run on.

    ``auto`` picks cuda, then mps, then cpu (as nanochat's ``autodetect_device_type``). An
    explicit ``cuda``/``cuda:N``/``mps`` that is not available is an error, not a silent fallback.

    Returns:
        A torch device string such as ``"cpu"`` or ``"cuda:0"``.

    Raises:
        BarkError: the requested device is unknown or not available here.
    """
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device == "cpu":
        return "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BarkError(f"device {device!r} was asked for but CUDA is not available here; use --device cpu (or auto)")
        return device
    if device == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise BarkError("device 'mps' was asked for but MPS is not available here; use --device cpu (or auto)")
        return device
    raise BarkError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")


def resolve_dtype(dtype: str, device: str) -> str:
    """Pick the compute dtype for autocast.

    ``auto`` gives bfloat16 on CUDA devices that support it, else float32 (this CPU runs bf16
    matmuls about 50x slower than fp32). Master weights always stay float32.

    Returns:
        One of ``"float32"``, ``"bfloat16"``, ``"float16"``.

    Raises:
        BarkError: an unknown dtype, or float16 requested off CUDA.
    """
    import torch

    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return "bfloat16"
        return "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise BarkError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    if dtype == "float16" and not device.startswith("cuda"):
        raise BarkError("dtype float16 needs a CUDA device (it trains with a GradScaler); use --dtype float32 on CPU")
    return dtype


# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, from the vendors' data sheets; the
# denominator of model FLOPs utilization (MFU, PaLM paper appendix B; nanoGPT's estimate_mfu).
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "A10G": 70e12,
    "L4": 121e12,
    "L40S": 362e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def peak_flops(device: str) -> float | None:
    """The device's peak dense bf16 FLOP/s when it is a CUDA GPU this table knows, else None.

    The longest matching name wins (``"H100 PCIe"`` before ``"H100"``). CPUs get None: their
    peak depends on the instruction set and core count, which MFU tables don't cover.
    """
    if not device.startswith("cuda"):
        return None
    import torch

    name = torch.cuda.get_device_name(torch.device(device))
    hits = [k for k in PEAK_BF16_FLOPS if k in name]
    return PEAK_BF16_FLOPS[max(hits, key=len)] if hits else None


def compile_fn(fn: Callable, device: str, **kwargs) -> Callable:
    """``torch.compile(fn, **kwargs)`` with the inductor options that pay off on ``device``.

    On CPU it turns on inductor's ``cpp_wrapper``: the code that calls the generated kernels is
    compiled C++ instead of Python, which removes ~1-2 ms of Python per training step and ~20%
    of a batch-1 decode step at our sizes (``bench/RESULTS.md``), for no extra compile time. The
    compile itself is lazy, as ``torch.compile``'s: errors surface on the first call.
    """
    import torch

    options = {"cpp_wrapper": True} if device == "cpu" else None
    return torch.compile(fn, options=options, **kwargs)


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    """Bits per byte (the Pile paper, Gao et al. 2020; nanochat's ``bpb``): a total negative
    log-likelihood in nats over the UTF-8 bytes it covers, in bits: ``nll / (n_bytes * ln 2)``;
    NaN when ``n_bytes`` is 0. Which tokens count: :func:`token_nll_and_bytes`."""
    return nll_nats / (n_bytes * math.log(2)) if n_bytes else float("nan")


def token_nll_and_bytes(logits, targets, token_bytes) -> dict:
    """The sums behind loss and bits per byte for one batch: the one definition that training's
    ``val_bpb`` and ``barkgpt eval`` share.

    Bits per byte is nanochat's ``evaluate_bpb``: each target token weighs the UTF-8 bytes of the
    text it decodes to (``token_bytes``); tokens that stand for no bytes (``<EOS>``, chat role
    tokens, ``<UNK>``) count neither their loss nor bytes, so
    ``bpb = sum(nats over targets with bytes > 0) / (ln 2 * sum(their bytes))``
    (:func:`bits_per_byte` of ``nll_bytes`` and ``bytes``). The loss per token counts every
    target that is not ignored (``-1``), ``<EOS>`` included.

    Args:
        logits: (B, T, vocab_size) float logits.
        targets: (B, T) int64 next-token ids; ``-1`` (``IGNORE_INDEX``) entries count for nothing.
        token_bytes: (vocab_size,) int64 tensor of bytes per token id (``Tokenizer.token_bytes``).

    Returns:
        ``{"nll": nats summed over all targets, "targets": their count, "nll_bytes": nats summed
        over the targets with bytes > 0, "bytes": the bytes of those targets}``.
    """
    import torch.nn.functional as F

    y = targets.reshape(-1)  # (B*T,)
    nll = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), y, ignore_index=-1, reduction="none"
    )  # (B*T,), 0 where ignored
    n_bytes = token_bytes.to(y.device)[y.clamp(min=0)] * (y >= 0)  # (B*T,) bytes per target, 0 where ignored
    has_bytes = n_bytes > 0
    return {
        "nll": nll.sum().item(),
        "targets": int((y >= 0).sum()),
        "nll_bytes": nll[has_bytes].sum().item(),
        "bytes": int(n_bytes.sum()),
    }


def atomic_write_via(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Have ``write(tmp_path)`` create a temporary file beside ``path``, then rename it into place.

    For writers that need a file name of their own (safetensors, GGUF). The file is fsynced
    before the rename; a crash or an exception at any point leaves either the old file or the new
    one, never a torn file, and removes the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    A crash at any point leaves either the old file or the new one, never a torn file.
    """
    atomic_write_via(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Build a directory in a temporary sibling, then swap it into place.

    Yields the temporary directory (a ``Path``) to fill. On success the old ``path`` (if any) is
    renamed aside, the new one renamed in, and the old one deleted: at every instant either the
    complete old directory or the complete new one sits at ``path`` (or at ``path.old`` during
    the two renames, which :func:`recover_dir` restores). On an exception the temporary
    directory is removed; a kill leaves it behind (``.{name}.*.tmp``, for
    :func:`remove_leftovers`); either way ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for f in tmp.iterdir():  # make the files durable before they become visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = path.with_name(path.name + ".old")
        if path.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_dir(path: str | os.PathLike) -> None:
    """Restore ``path`` from ``path.old`` if a kill fell between the two renames of :func:`atomic_dir`.

    Raises:
        OSError: the rename failed (a read-only folder, say).
    """
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if old.is_dir() and not old.is_symlink() and not path.exists():
        os.replace(old, path)


def remove_leftovers(folder: str | os.PathLike, names: list[str]) -> list[Path]:
    """Delete what kills left behind in ``folder`` for the entries ``names``.

    That is the temporary siblings of :func:`atomic_dir` and :func:`atomic_write_via`
    (``.{name}.*.tmp``, files or folders; a checkpoint's is as big as the checkpoint) and a
    ``{name}.old`` beside a complete ``{name}`` (a kill while :func:`atomic_dir` deleted it).
    Call it only when nothing else writes those entries (a run's start). Symlinks are unlinked,
    never followed.

    Returns:
        The paths removed.
    """
    folder = Path(folder)
    gone = []
    for name in names:
        old = folder / f"{name}.old"
        stale = [*folder.glob(f".{glob.escape(name)}.*.tmp"), *([old] if (folder / name).is_dir() and old.exists() else [])]
        for p in stale:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            gone.append(p)
    return gone


def progress(total: int | None = None, desc: str = "", unit: str = "it", **kwargs):
    """A tqdm progress bar on stderr, quiet when stderr is not a terminal and ``BARKGPT_PROGRESS`` is unset.

    Args:
        total: number of steps (or bytes, with ``unit="B"``), None if unknown.
        desc: label shown on the left.
        unit: what one step counts.
    """
    from tqdm.auto import tqdm

    disable = not (sys.stderr.isatty() or os.environ.get("BARKGPT_PROGRESS"))
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, **kwargs)


def get_lr(it: int, cfg) -> float:
    """Learning rate at step ``it`` of a :class:`~barkgpt.config.TrainConfig`: linear warmup to
    ``learning_rate`` over ``warmup_iters``, then to ``min_lr`` at ``lr_decay_iters`` and
    ``min_lr`` after it. The decay is ``cfg.lr_schedule``: ``cosine`` (SGDR, Loshchilov & Hutter
    2016; nanoGPT's ``get_lr``), or ``wsd``, warmup-stable-decay: constant, then linear over the
    last ``lr_cooldown_frac`` of the steps after warmup (Hu et al. 2024, MiniCPM; Hagele et al.
    2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations"; the
    modded-nanogpt speedruns' schedule). Shared by the torch and NumPy trainers, so both follow
    one schedule."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)  # [0, 1)
    if cfg.lr_schedule == "wsd":
        decay = min(1.0, (1.0 - ratio) / cfg.lr_cooldown_frac)  # 1 until the cooldown, then linear to 0
        return cfg.min_lr + decay * (cfg.learning_rate - cfg.min_lr)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


class DeferredSigint:
    """SIGINT as ``KeyboardInterrupt``, except inside :meth:`critical`, which holds it until the
    section is done and raises it then: an update that must not be cut in half (the optimizer
    steps, ``zero_grad``, the step count) finishes first. Shared by the torch and NumPy trainers.

    Used as a context manager around training: it installs its handler on entry and puts the
    previous one back on exit. Off the main thread (where Python cannot set signal handlers)
    it does nothing and SIGINT keeps its usual behaviour. :attr:`hold` set True holds every
    SIGINT from then on (used while the interrupted run saves ``last/``).
    """

    def __init__(self):
        self.hold = False  # True: SIGINT only sets `pending`
        self.pending = False  # a SIGINT arrived while held
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False

    def _handle(self, signum, frame):
        if self.hold:
            self.pending = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def critical(self):
        """Hold SIGINT inside the ``with`` block; a held one is raised when the block ends."""
        self.hold = True
        try:
            yield
        finally:
            self.hold = False
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


def check_prompt(prompt, block_size: int) -> None:
    """Check a prompt of token ids before prefill: 1 <= ``len(prompt)`` <= ``block_size``.

    Raises:
        BarkError: the prompt is empty or longer than the model's context.
    """
    if len(prompt) == 0:
        raise BarkError("the prompt is empty; give at least one token (e.g. start from <EOS>)")
    if len(prompt) > block_size:
        raise BarkError(
            f"the prompt has {len(prompt)} tokens but the model's block_size is {block_size}; shorten it or use --truncate"
        )
