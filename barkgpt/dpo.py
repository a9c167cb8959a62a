"""Preference tuning: Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference
Optimization: Your Language Model is Secretly a Reward Model").

The policy starts from a trained (usually fine-tuned) model; a frozen copy of that model is the
reference. For a prompt x with a chosen reply y_w and a rejected one y_l, the loss is

    -log sigmoid(beta * ((log pi(y_w|x) - log pi(y_l|x)) - (log ref(y_w|x) - log ref(y_l|x))))

with each log-probability summed over the completion's tokens only (the assistant reply through
its ``<EOS>``; :mod:`barkgpt.preferences` packs and masks the pairs). The reference never
changes, so its log-probabilities are computed once per run, before the first step (the
"precompute_ref_log_probs" of TRL's DPOTrainer), and the reference model is dropped.

Everything else is ``train.py``'s :class:`~barkgpt.train.Trainer`, which :class:`DPOTrainer`
subclasses with another objective (:meth:`~DPOTrainer.batch_loss`) and evaluation
(:meth:`~DPOTrainer.estimate`, :meth:`~DPOTrainer.eval_row`): checkpoints, exact resume, the
progress bar, ``metrics.jsonl`` and ``loss.png`` (the DPO loss) are finetune's. Each evaluation
logs, over the val pairs, TRL's names: ``rewards/chosen``, ``rewards/rejected`` (the implicit
rewards ``beta * (log pi - log ref)``), ``rewards/accuracies`` (share with chosen > rejected),
``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (policy) and ``ref_logps/chosen``,
``ref_logps/rejected`` (reference); ``val_loss`` is the DPO loss, which picks ``best/``.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from barkgpt.checkpoint import find_checkpoint, read_checkpoint_config
from barkgpt.common import BarkError
from barkgpt.config import GPTConfig, TrainConfig, build_configs
from barkgpt.conversations import IGNORE_INDEX, file_sha256, split_conversations
from barkgpt.preferences import PreferencePairs, load_preference_pairs
from barkgpt.tokenizer import Tokenizer
from barkgpt.train import SegmentMask, Trainer, build_model, to_device, train

# DPO moves a tuned model a little: a lower learning rate and fewer steps than finetune's
# (flags and --config still override each one).
DPO_DEFAULTS = {
    "max_iters": 200,
    "learning_rate": 1e-4,
    "min_lr": 1e-5,
    "warmup_iters": 10,
    "eval_interval": 25,
    "eval_iters": 10,
    "log_interval": 5,
    "batch_size": 8,
    "weight_decay": 0.0,
}
METRIC_NAMES = (
    "rewards/accuracies",
    "rewards/margins",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
    "ref_logps/chosen",
    "ref_logps/rejected",
)


def sequence_logps(
    model, x: torch.Tensor, y: torch.Tensor, segments: torch.Tensor, seq: torch.Tensor, n_seq: int
) -> torch.Tensor:
    """Each packed sequence's summed log-probability of its targets.

    Args:
        model: a ``GPT``.
        x, y, segments, seq: (N, T) int64 inputs, targets (``IGNORE_INDEX`` off the completion),
            segment ids and sequence indices (-1 on padding), as ``PreferencePairs`` batches them.
        n_seq: the number of sequences (indices 0..n_seq-1).

    Returns:
        (n_seq,) float32: sum over each sequence's targets of log p(y_t | x_<=t), in nats.
    """
    logits, _ = model(x, None, SegmentMask(segments))  # (N, T, vocab_size): all positions with a mask
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (N, T)
    keep = y != IGNORE_INDEX
    return torch.zeros(n_seq, dtype=logp.dtype, device=logp.device).index_add(0, seq[keep], logp[keep])


def dpo_loss(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO loss of B pairs (Rafailov et al. 2023, eq. 7), from summed completion log-probs.

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: (B,) log-probabilities in nats.
        beta: the strength of the implicit KL penalty (0.1 in the paper and TRL).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each (B,): ``-log sigmoid(beta * margin)``
        per pair, and the implicit rewards ``beta * (log pi - log ref)`` (detached).
    """
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)  # (B,)
    losses = -F.logsigmoid(beta * logits)
    return losses, beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()


def pair_logps(model, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) policy log-probs of the chosen and the rejected completions of a batch (see
    :class:`~barkgpt.preferences.PreferencePairs`)."""
    x, y, segments, seq, ref = batch
    logps = sequence_logps(model, x, y, segments, seq, 2 * len(ref))
    return logps[0::2], logps[1::2]


class DPOTrainer(Trainer):
    """:class:`~barkgpt.train.Trainer` with the DPO objective on a ``PreferencePairs`` source.

    The reference is the model at ``cfg.init_from``, loaded (its embeddings grown as the
    policy's) and run once over every pair of both splits before training; its log-probs ride
    in each batch. On resume they are recomputed from the same checkpoint (the same numbers on
    CPU), with the torch RNG left as it was, so the resumed run continues exactly.

    Raises:
        BarkError: the source is not preference pairs, or a resume with another ``beta``.
    """

    def __init__(self, model_cfg: GPTConfig, cfg: TrainConfig, ctx, resume: bool, quiet: bool, source, beta: float = 0.1):
        if not isinstance(source, PreferencePairs):
            raise BarkError("DPO needs preference pairs (prompt/chosen/rejected rows or OASST trees) as its data")
        super().__init__(model_cfg, cfg, ctx, resume, quiet, source)
        self.beta = beta
        self.info["dpo"] = {"beta": beta, "reference": cfg.init_from}
        if self.resumed:
            saved = read_checkpoint_config(self.out_dir / "last").get("dpo") or {}
            if saved.get("beta") not in (None, beta):
                raise BarkError(f"--resume: the run was trained with --beta {saved['beta']}; resume with the same beta")
        with torch.random.fork_rng(devices=[]):  # building the reference must not move the dropout stream
            reference = build_model(model_cfg, cfg, self.tokenizer, self.device, None).eval()
            for split in self.source.splits:
                self.source.set_reference(split, self.reference_logps(reference, split))
        del reference

    @torch.no_grad()
    def reference_logps(self, reference, split: str) -> np.ndarray:
        """(n_pairs, 2) float64: the reference's summed log-probs of each pair's chosen and
        rejected completion in ``split``."""
        out = np.zeros((len(self.source.splits[split]), 2))
        # no gradients here: larger batches (up to 256 pairs, logits of at most 2**25 floats) cut the forwards
        n_pairs = min(256, max(self.cfg.batch_size, (1 << 25) // (2 * self.block_size * self.model_cfg.vocab_size)))
        for ix, batch in self.source.all_batches(split, n_pairs, self.block_size):
            with self.autocast:
                chosen, rejected = pair_logps(reference, to_device(batch, self.device))
            out[ix, 0], out[ix, 1] = chosen.double().cpu().numpy(), rejected.double().cpu().numpy()
        return out

    def batch_loss(self, model, batch: tuple) -> torch.Tensor:
        """The mean DPO loss of a batch's pairs (a scalar tensor)."""
        chosen, rejected = pair_logps(model, batch)
        ref = batch[4].to(chosen.dtype)  # (B, 2)
        return dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], self.beta)[0].mean()

    @torch.no_grad()
    def estimate(self) -> dict:
        """The DPO loss of each split's eval pairs and, per split, TRL's metrics (see the module
        docstring) as means over its pairs.

        Returns:
            ``{"train": float, "val": float, "metrics": {"train": {...}, "val": {...}}}``.
        """
        self.raw_model.eval()
        out: dict = {"metrics": {}}
        for split in ("train", "val"):
            cols: dict[str, list] = {k: [] for k in ("pc", "pr", "rc", "rr")}
            for batch in self.source.eval_batches(split, self.cfg.eval_iters, self.cfg.batch_size, self.block_size):
                batch = to_device(batch, self.device)
                with self.autocast:
                    pc, pr = pair_logps(self.raw_model, batch)
                for k, v in zip(cols, (pc, pr, batch[4][:, 0], batch[4][:, 1])):
                    cols[k].append(v.double().cpu())
            pc, pr, rc, rr = (torch.cat(cols[k]) for k in cols)
            losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, self.beta)
            out[split] = losses.mean().item()
            values = (chosen_r > rejected_r, chosen_r - rejected_r, chosen_r, rejected_r, pc, pr, rc, rr)
            out["metrics"][split] = {name: round(v.double().mean().item(), 5) for name, v in zip(METRIC_NAMES, values)}
        self.raw_model.train()
        return out

    def eval_line(self, losses: dict) -> str:
        """The progress line after an evaluation: DPO losses and the val pairs' reward accuracy and
        margin (a perplexity of the DPO loss would mean nothing)."""
        m = losses["metrics"]["val"]
        return (
            f"step {self.state.step}: DPO loss train {losses['train']:.4f}, val {losses['val']:.4f}; "
            f"val reward accuracy {m['rewards/accuracies']:.3f}, margin {m['rewards/margins']:+.4f}"
        )

    def eval_row(self, losses: dict) -> dict:
        """The ``metrics.jsonl`` row: ``val_loss`` and ``eval_train_loss`` (DPO losses), the val
        pairs' metrics under TRL's names, and the train pairs' reward accuracy."""
        return {
            "step": self.state.step,
            "val_loss": round(losses["val"], 5),
            "eval_train_loss": round(losses["train"], 5),
            **losses["metrics"]["val"],
            "train_rewards/accuracies": losses["metrics"]["train"]["rewards/accuracies"],
            "elapsed_s": round(self.state.elapsed_s, 3),
        }


def run_dpo(source: PreferencePairs, cfg: TrainConfig, beta: float = 0.1, resume: bool = False, quiet: bool = False) -> dict:
    """Train ``cfg.init_from`` (a checkpoint folder) with DPO on ``source``, into ``cfg.out_dir``.

    Returns:
        ``train.train``'s summary dict (losses are DPO losses).

    Raises:
        BarkError: ``beta`` not positive, no checkpoint at ``cfg.init_from``, or as ``train`` raises.
    """
    if not beta > 0:
        raise BarkError(f"beta must be positive (0.1 is usual), got {beta}")
    ckpt = find_checkpoint(cfg.init_from)
    base = GPTConfig(**read_checkpoint_config(ckpt)["model"])
    model_cfg = dataclasses.replace(base, vocab_size=max(base.vocab_size, source.tokenizer.vocab_size))
    cfg = dataclasses.replace(cfg, init_from=str(ckpt))
    return train(
        model_cfg, cfg, resume=resume, quiet=quiet, source=source, trainer_class=functools.partial(DPOTrainer, beta=beta)
    )


def dpo(
    model_path: str | Path,
    data: str | Path,
    cfg: TrainConfig,
    beta: float = 0.1,
    val_fraction: float = 0.1,
    resume: bool = False,
    quiet: bool = False,
) -> dict:
    """DPO of a trained model on preference pairs from a file (``barkgpt dpo``).

    Reads the pairs (:func:`preferences.load_preference_pairs`), splits them by group (OASST
    tree; ``conversations.split_conversations``, seeded by ``cfg.seed``), gives the model's
    tokenizer the chat role tokens if it lacks them (as ``finetune``), and runs :func:`run_dpo`.

    Args:
        model_path: a run or checkpoint folder (``best/`` is preferred in a run folder).
        data: a ``.jsonl`` of TRL preference rows or OpenAssistant message trees.
        cfg: run settings (``init_from`` and ``data`` are set from the two paths above).
        beta: DPO's beta.
        val_fraction: share of the groups held out for validation, in (0, 0.5].
        resume: continue from ``cfg.out_dir/last``.
        quiet: no progress bar or banner.

    Returns:
        ``train.train``'s summary dict.

    Raises:
        BarkError: no checkpoint, bad preference data, fewer than 2 groups, or as ``train`` raises.
    """
    ckpt = find_checkpoint(model_path)
    tokenizer, _ = Tokenizer.load(ckpt).with_chat_tokens()
    train_p, val_p = split_conversations(load_preference_pairs(data), val_fraction, cfg.seed)
    meta = {"source": str(Path(data).resolve()), "source_sha256": file_sha256(data), "base_model": str(ckpt.resolve())}
    source = PreferencePairs(tokenizer, {"train": train_p, "val": val_p}, meta)
    first = val_p[0]["prompt"]
    changes = {"init_from": str(ckpt), "data": str(data)}
    if not cfg.sample_prompt:  # samples.jsonl then shows a reply to a held-out prompt
        changes["sample_prompt"] = tokenizer.apply_chat_template(first, add_generation_prompt=True)
    return run_dpo(source, dataclasses.replace(cfg, **changes), beta=beta, resume=resume, quiet=quiet)


def train_preference_preset(cfg: TrainConfig, source: PreferencePairs, beta: float = 0.1, resume: bool = False) -> dict:
    """``barkgpt train`` on a generated preference dataset (a preset whose data is one): DPO
    from ``cfg.init_from``; when that is ``scratch``, the source's ``base_preset`` is trained
    first into ``out_dir/base`` (kept, so a resumed run reuses it) and tuned from there.

    Raises:
        BarkError: ``scratch`` with no base preset to train, or as :func:`run_dpo` raises.
    """
    if cfg.init_from == "scratch":
        if source.base_preset is None:
            raise BarkError("DPO starts from a trained model; pass --init-from RUN (a run or checkpoint folder)")
        base_dir = Path(cfg.out_dir) / "base"
        try:
            find_checkpoint(base_dir)
        except BarkError:
            print(f"training the base model ({source.base_preset} preset) into {base_dir} first")
            base_model, base_cfg = build_configs(source.base_preset, overrides={"out_dir": str(base_dir), "device": cfg.device})
            train(base_model, base_cfg)
        cfg = dataclasses.replace(cfg, init_from=str(base_dir))
    return run_dpo(source, cfg, beta=beta, resume=resume)
