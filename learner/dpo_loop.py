"""A plain PyTorch DPO loop over LoRA parameters (Rafailov et al., 2023).

It needs only torch and peft, so DPO runs wherever SFT runs (a GPU machine without trl
included). The reference policy is the model as it stands when DPO starts (after SFT, or
the base): its log-probabilities of every chosen and rejected reply are computed once, up
front, so no second copy of the model is kept.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from learner.sft_loop import IGNORE_INDEX, StepHook, _collate, lr_at

__all__ = ["DpoPair", "DpoResult", "balance_lengths", "reply_logps", "run_dpo"]

log = logging.getLogger(__name__)


@dataclass
class DpoPair:
    """One context with a chosen and a rejected reply, tokenized with labels on the reply."""

    chosen: Any  # a TokenizedExample
    rejected: Any
    ref_chosen: float = 0.0
    ref_rejected: float = 0.0

    @property
    def length_gap(self) -> int:
        """Reply tokens of the chosen side minus the rejected side."""
        return int(self.chosen.label_tokens - self.rejected.label_tokens)

    @property
    def chosen_tokens(self) -> int:
        return int(self.chosen.label_tokens)


def balance_lengths(pairs: list[DpoPair]) -> list[DpoPair]:
    """Drop the pairs with the largest length gap on the majority side until as many pairs
    prefer the longer reply as the shorter one (ties stay): the critic's taste for length
    is then no signal the policy can learn. Order is kept."""
    longer = [k for k, p in enumerate(pairs) if p.length_gap > 0]
    shorter = [k for k, p in enumerate(pairs) if p.length_gap < 0]
    major, minor = (longer, shorter) if len(longer) >= len(shorter) else (shorter, longer)
    by_gap = sorted(major, key=lambda k: (-abs(pairs[k].length_gap), k))
    dropped = set(by_gap[: len(major) - len(minor)])
    return [p for k, p in enumerate(pairs) if k not in dropped]


@dataclass
class DpoResult:
    steps: int
    seconds: float
    # After training: the share of pairs whose implicit reward prefers the chosen reply,
    # and the mean policy-minus-reference margin (both 0 before training, by definition).
    accuracy: float
    mean_margin: float
    loss_history: list[dict[str, Any]] = field(default_factory=list)


def reply_logps(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Summed log-probability of each row's labelled (reply) tokens."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    target = batch["labels"][:, 1:]
    keep = target != IGNORE_INDEX
    logits = base.get_output_embeddings()(out.last_hidden_state[:, :-1][keep]).float()
    token_logps = torch.log_softmax(logits, dim=-1).gather(1, target[keep][:, None]).squeeze(1)
    rows = keep.nonzero()[:, 0]
    return torch.zeros(keep.shape[0], device=logits.device).index_add(0, rows, token_logps)


def _pair_logps(
    model: Any, pairs: Sequence[DpoPair], pad_id: int, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    batch = _collate([*(p.chosen for p in pairs), *(p.rejected for p in pairs)], pad_id, device)
    logps = reply_logps(model, batch)
    return logps[: len(pairs)], logps[len(pairs) :]


def _margins(
    model: Any, pairs: Sequence[DpoPair], pad_id: int, device: str, size: int
) -> list[float]:
    """Policy-minus-reference log-ratio margins (chosen minus rejected), without gradients."""
    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(pairs), size):
            part = pairs[start : start + size]
            chosen, rejected = _pair_logps(model, part, pad_id, device)
            for p, c, r in zip(part, chosen.tolist(), rejected.tolist(), strict=True):
                out.append((c - p.ref_chosen) - (r - p.ref_rejected))
    return out


def run_dpo(
    model: Any,
    pairs: list[DpoPair],
    *,
    pad_id: int,
    device: str,
    beta: float,
    learning_rate: float,
    total_steps: int,
    warmup_steps: int,
    schedule: str,
    batch_size: int,
    max_grad_norm: float,
    seed: int,
    on_step: StepHook | None = None,
    length_alpha: float = 0.0,
    chosen_nll: float = 0.0,
) -> DpoResult:
    """Train the trainable (LoRA) parameters on ``pairs`` for ``total_steps`` steps.

    ``length_alpha`` > 0 adds alpha x (chosen minus rejected reply tokens) to each pair's
    margin inside the sigmoid (R-DPO, Park et al., 2024): the part of a preference that
    length explains is then credited to length, not to the policy. Where critics prefer
    longer replies, plain DPO learns length itself, and longer replies run into the cap.

    ``chosen_nll`` > 0 adds that weight x each chosen reply's mean token negative
    log-likelihood to the loss (RPO): the policy keeps the chosen text likely instead of
    only widening the gap between the two replies."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            part = pairs[start : start + batch_size]
            chosen, rejected = _pair_logps(model, part, pad_id, device)
            for p, c, r in zip(part, chosen.tolist(), rejected.tolist(), strict=True):
                p.ref_chosen, p.ref_rejected = c, r
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate)
    rng = random.Random(seed)
    order: list[int] = []
    history: list[dict[str, Any]] = []
    started = time.perf_counter()
    for step in range(total_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total_steps, warmup_steps, learning_rate, schedule)
        if len(order) < batch_size:
            fresh = list(range(len(pairs)))
            rng.shuffle(fresh)
            order.extend(fresh)
        part = [pairs[i] for i in order[:batch_size]]
        del order[:batch_size]
        chosen, rejected = _pair_logps(model, part, pad_id, device)
        ref_c = torch.tensor([p.ref_chosen for p in part], device=chosen.device)
        ref_r = torch.tensor([p.ref_rejected for p in part], device=chosen.device)
        margin = (chosen - ref_c) - (rejected - ref_r)
        gap = torch.tensor([float(p.length_gap) for p in part], device=chosen.device)
        loss = -torch.nn.functional.logsigmoid(beta * margin + length_alpha * gap).mean()
        if chosen_nll > 0:
            tokens = torch.tensor([p.chosen_tokens for p in part], device=chosen.device)
            loss = loss + chosen_nll * (-chosen / tokens.clamp(min=1)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        history.append({"stage": "dpo", "step": step + 1, "loss": value})
        if on_step is not None:
            on_step(step + 1, total_steps, value)
    seconds = time.perf_counter() - started
    model.eval()
    after = _margins(model, pairs, pad_id, device, batch_size)
    if was_training:
        model.train()
    accuracy = sum(m > 0 for m in after) / len(after) if after else 0.0
    mean = sum(after) / len(after) if after else 0.0
    return DpoResult(total_steps, seconds, accuracy, mean, history)
