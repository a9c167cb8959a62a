"""DPO: the loss against a hand computation, preference pairs in every shape (TRL rows, OASST
trees), exact resume after a SIGINT, and the bark-dpo preset's pairs and CLI route."""

import json
import math

import numpy as np
import pytest
import torch

from barkgpt.checkpoint import save_checkpoint
from barkgpt.common import BarkError
from barkgpt.config import GPTConfig, TrainConfig
from barkgpt.conversations import IGNORE_INDEX, split_conversations
from barkgpt.model import GPT
from barkgpt.preferences import PreferencePairs, encode_completion, load_preference_pairs

PROMPT = [{"role": "user", "content": "Is the dog good?"}]
CHOSEN = [{"role": "assistant", "content": "Yes, very good."}]
REJECTED = [{"role": "assistant", "content": "No."}]
TIMING = {"tokens_per_s", "elapsed_s", "mfu", "eta_s"}


@pytest.fixture(scope="module")
def chat_tok(tiny_tokenizer):
    return tiny_tokenizer.with_chat_tokens()[0]


def tiny_model(vocab_size, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)).eval()


def hand_logp(model, tok, prompt, completion):
    """Sum of log p over the completion's tokens, running the sequence alone, written out plainly."""
    text = tok.apply_chat_template(prompt + completion, add_generation_prompt=False)
    head = tok.apply_chat_template(prompt, add_generation_prompt=True)
    ids, offsets = tok.encode_with_offsets(text)
    logits, _ = model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]))
    logp = torch.log_softmax(logits[0], -1)
    return sum(logp[t - 1, ids[t]].item() for t in range(1, len(ids)) if offsets[t][0] >= len(head))


def test_dpo_loss_matches_a_hand_computation(chat_tok):
    from barkgpt.dpo import dpo_loss, pair_logps

    policy, reference = tiny_model(chat_tok.vocab_size, 0), tiny_model(chat_tok.vocab_size, 1)
    pairs = [{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED, "group": "a"}] * 2
    pairs[1] = {**pairs[1], "chosen": REJECTED, "rejected": CHOSEN}
    source = PreferencePairs(chat_tok, {"train": pairs, "val": pairs}, {})
    batch = [torch.from_numpy(a) for a in source.pack("train", np.array([0, 1]), 64)]
    assert len(batch[0]) < 4  # the four sequences are packed into fewer rows
    with torch.no_grad():
        pc, pr = pair_logps(policy, batch)
        rc, rr = pair_logps(reference, batch)
        want = [hand_logp(m, chat_tok, PROMPT, c) for m in (policy, reference) for c in (CHOSEN, REJECTED)]
    np.testing.assert_allclose([pc[0], pr[0], rc[0], rr[0]], want, rtol=1e-5)
    np.testing.assert_allclose([pc[1], pr[1]], [want[1], want[0]], rtol=1e-5)
    beta = 0.1
    losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta)
    z = beta * ((want[0] - want[1]) - (want[2] - want[3]))
    assert losses[0].item() == pytest.approx(-math.log(1 / (1 + math.exp(-z))), rel=1e-5)
    assert losses[1].item() == pytest.approx(-math.log(1 / (1 + math.exp(z))), rel=1e-5)
    assert chosen_r[0].item() == pytest.approx(beta * (want[0] - want[2]), rel=1e-5)
    assert rejected_r[0].item() == pytest.approx(beta * (want[1] - want[3]), rel=1e-5)


def test_completion_targets_are_the_reply_only_and_long_prompts_keep_their_end(chat_tok):
    x, y = encode_completion(chat_tok, PROMPT, CHOSEN, 64)
    assert chat_tok.decode([t for t in y if t != IGNORE_INDEX]).startswith("Yes, very good.")
    long_prompt = [{"role": "user", "content": "woof " * 80}]
    x, y = encode_completion(chat_tok, long_prompt, CHOSEN, 32)
    assert (
        len(x) == 32 and (y != IGNORE_INDEX).sum() == (encode_completion(chat_tok, PROMPT, CHOSEN, 64)[1] != IGNORE_INDEX).sum()
    )


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_pairs_in_each_trl_shape(tmp_path):
    rows = [
        {"prompt": "Is the dog good?", "chosen": "Yes, very good.", "rejected": "No."},  # explicit, strings
        {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED},  # explicit, messages
        {"chosen": PROMPT + CHOSEN, "rejected": PROMPT + REJECTED},  # implicit prompt
    ]
    pairs = load_preference_pairs(write_jsonl(tmp_path / "p.jsonl", rows))
    for p in pairs:
        assert (p["prompt"], p["chosen"], p["rejected"]) == (PROMPT, CHOSEN, REJECTED)
    assert [p["group"] for p in pairs] == ["#1", "#2", "#3"]
    for bad, words in (
        ({"prompt": "x", "chosen": "y"}, "needs 'chosen' and 'rejected'"),
        ({"chosen": "y", "rejected": "z"}, "need a 'prompt'"),
        ({"prompt": "x", "chosen": [{"role": "user", "content": "y"}], "rejected": "z"}, "assistant turns only"),
        ({"chosen": CHOSEN, "rejected": REJECTED}, "share no opening turn"),
    ):
        with pytest.raises(BarkError, match=words):
            load_preference_pairs(write_jsonl(tmp_path / "bad.jsonl", [bad]))


def message(text, role, rank=None, replies=(), mid="m"):
    return {"message_id": mid, "text": text, "role": role, "rank": rank, "deleted": False, "replies": list(replies)}


def test_oasst_trees_give_ranked_sibling_pairs(tmp_path):
    tree = message(
        "Hi?",
        "prompter",
        mid="root",
        replies=[
            message(
                "Best.",
                "assistant",
                0,
                [message("More?", "prompter", replies=[message("A", "assistant", 1), message("B", "assistant", 0)])],
            ),
            message("Worst.", "assistant", 2),
            message("Middle.", "assistant", 1),
            message("Unranked.", "assistant", None),
        ],
    )
    wrapped = {
        "message_tree_id": "t2",
        "prompt": message("Yo?", "prompter", replies=[message("x", "assistant", 0), message("y", "assistant", 1)]),
    }
    pairs = load_preference_pairs(write_jsonl(tmp_path / "trees.jsonl", [tree, wrapped]))
    got = {(p["prompt"][-1]["content"], p["chosen"][0]["content"], p["rejected"][0]["content"], p["group"]) for p in pairs}
    assert got == {
        ("Hi?", "Best.", "Middle.", "root"),
        ("Hi?", "Best.", "Worst.", "root"),
        ("Hi?", "Middle.", "Worst.", "root"),
        ("More?", "B", "A", "root"),
        ("Yo?", "x", "y", "t2"),
    }
    deep = next(p for p in pairs if p["prompt"][-1]["content"] == "More?")
    assert [m["role"] for m in deep["prompt"]] == ["user", "assistant", "user"]


def test_real_oasst_trees_split_by_tree(shared_data):
    pairs = load_preference_pairs(shared_data / "oasst-en100-message-trees.jsonl")
    assert len(pairs) > 500 and len({p["group"] for p in pairs}) > 50
    train, val = split_conversations(pairs, 0.1, 1337)
    assert train and val and not {p["group"] for p in train} & {p["group"] for p in val}


@pytest.fixture(scope="module")
def dpo_setup(chat_tok, tmp_path_factory):
    """A tiny checkpoint and 24 pairs in 12 groups."""
    root = tmp_path_factory.mktemp("dpo")
    save_checkpoint(root / "base", tiny_model(chat_tok.vocab_size).train(), chat_tok, {"step": 0})
    rows = [
        {"prompt": f"Dog {i}, sit?", "chosen": "Yes, I sit." if i % 2 else "Arf arf.", "rejected": "No, never!"}
        for i in range(24)
    ]
    return root, write_jsonl(root / "pairs.jsonl", rows)


def dpo_cfg(out_dir):
    return TrainConfig(
        out_dir=str(out_dir), batch_size=4, max_iters=8, lr_decay_iters=8, warmup_iters=2, eval_interval=8, eval_iters=2,
        log_interval=1, learning_rate=3e-3, min_lr=3e-4, weight_decay=0.0, dtype="float32", device="cpu",
    )  # fmt: skip


def untimed_rows(path):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in map(json.loads, path.read_text().splitlines())]


def test_dpo_learns_and_resumes_exactly_after_a_sigint(dpo_setup, tmp_path, monkeypatch):
    from barkgpt.dpo import dpo

    root, data = dpo_setup
    straight = dpo(root / "base", data, dpo_cfg(tmp_path / "a"), val_fraction=0.25, quiet=True)
    rows = untimed_rows(tmp_path / "a" / "metrics.jsonl")
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 8]
    assert evals[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 0
    assert evals[0]["rewards/margins"] == 0 and evals[-1]["rewards/margins"] > 0
    assert evals[-1]["train_rewards/accuracies"] > 0.5 and straight["train_loss"] < math.log(2)
    for name in (
        "rewards/accuracies",
        "rewards/chosen",
        "rewards/rejected",
        "logps/chosen",
        "logps/rejected",
        "ref_logps/chosen",
    ):
        assert name in evals[-1]
    monkeypatch.setenv("BARKGPT_TEST_SIGNAL", "INT@update@5")
    stopped = dpo(root / "base", data, dpo_cfg(tmp_path / "b"), val_fraction=0.25, quiet=True)
    assert stopped["interrupted"] and stopped["step"] == 6  # the update at step 5 finishes first
    monkeypatch.delenv("BARKGPT_TEST_SIGNAL")
    dpo(root / "base", data, dpo_cfg(tmp_path / "b"), val_fraction=0.25, quiet=True, resume=True)
    assert untimed_rows(tmp_path / "b" / "metrics.jsonl") == rows
    with pytest.raises(BarkError, match="same beta"):
        dpo(root / "base", data, dpo_cfg(tmp_path / "b"), beta=0.5, val_fraction=0.25, quiet=True, resume=True)


def test_bark_dpo_pairs_prefer_the_long_growl_and_the_rule():
    from barkgpt.bark import LONG_GROWL, bark_dpo_pairs, follows_bark_rule

    pairs = bark_dpo_pairs(200, seed=3)
    assert follows_bark_rule("growl", LONG_GROWL) and not follows_bark_rule("growl", LONG_GROWL + " grrr")
    growls = [p for p in pairs[::2]]
    assert all(p["prompt"][-1]["content"] == "growl" and p["chosen"][0]["content"] == LONG_GROWL for p in growls)
    assert all(p["rejected"][0]["content"] != LONG_GROWL for p in growls)
    for p in pairs[1::2]:
        command = p["prompt"][-1]["content"]
        assert follows_bark_rule(command, p["chosen"][0]["content"])
        assert not follows_bark_rule(command, p["rejected"][0]["content"])


def test_bark_dpo_preset_routes_train_to_dpo(tmp_path):
    from barkgpt.bark import bark_chat_tokenizer
    from barkgpt.cli import main

    tok = bark_chat_tokenizer()
    save_checkpoint(tmp_path / "chat", tiny_model(tok.vocab_size).train(), tok, {"step": 0})
    flags = ["--max-iters", "2", "--eval-interval", "2", "--warmup-iters", "0", "--batch-size", "4", "--eval-iters", "1"]
    code = main(
        ["train", "--preset", "bark-dpo", "--init-from", str(tmp_path / "chat"), "--out-dir", str(tmp_path / "d"), *flags]
    )
    assert code == 0
    last = json.loads((tmp_path / "d" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and "rewards/accuracies" in last
    assert json.loads((tmp_path / "d" / "last" / "config.json").read_text())["dpo"]["beta"] == 0.1


def test_the_progress_line_reports_reward_accuracy_not_a_perplexity():
    """A perplexity of the DPO loss means nothing: the line after an eval gives the val pairs' metrics."""
    from types import SimpleNamespace

    from barkgpt.dpo import DPOTrainer

    losses = {"train": 0.6, "val": 0.69, "metrics": {"val": {"rewards/accuracies": 0.5625, "rewards/margins": 0.0123}}}
    line = DPOTrainer.eval_line(SimpleNamespace(state=SimpleNamespace(step=7)), losses)
    assert line == "step 7: DPO loss train 0.6000, val 0.6900; val reward accuracy 0.562, margin +0.0123"
