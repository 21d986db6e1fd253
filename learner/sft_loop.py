"""A plain PyTorch LoRA SFT loop: length-bucketed batches, loss on labelled tokens only.

It needs only torch and peft (no trl), so the same code trains on a CPU and on a GPU
machine that has no trl. Batches group examples of similar length, so padding stays small
and a large batch fills the GPU; the loss is the mean over labelled (reply) tokens.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from learner.distributed import Rank

__all__ = [
    "LoopResult",
    "StepHook",
    "bucket_batches",
    "heldout_loss",
    "lr_at",
    "pack_rows",
    "reduce_gradients",
    "run_sft",
]

log = logging.getLogger(__name__)
IGNORE_INDEX = -100
StepHook = Callable[[int, int, float], None]


@dataclass
class LoopResult:
    steps: int
    seconds: float
    tokens: int  # tokens run through the model (padding excluded)
    loss_history: list[dict[str, Any]] = field(default_factory=list)


def bucket_batches(
    lengths: Sequence[int], batch_size: int, *, seed: int = 0, epoch: int = 0
) -> list[list[int]]:
    """Indices grouped into batches of similar length, in a shuffled order of batches.

    Examples are shuffled, cut into chunks of 50 batches, and sorted by length inside each
    chunk, so batches mix lengths across the run but pad little.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = max(1, batch_size) * 50
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        batches.extend(part[k : k + batch_size] for k in range(0, len(part), batch_size))
    rng.shuffle(batches)
    return batches


def lr_at(step: int, total: int, warmup: int, peak: float, schedule: str) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if schedule.startswith("constant"):
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
    if schedule == "linear":
        return peak * max(0.0, 1.0 - progress)
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")


def _collate(examples: Sequence[Any], pad_id: int, device: str) -> dict[str, Any]:
    import torch

    width = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for r, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[r, :n] = torch.tensor(ex.input_ids)
        labels[r, :n] = torch.tensor(ex.labels)
        mask[r, :n] = 1
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "labels": labels.to(device),
    }


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices packed into rows of at most ``capacity`` tokens (first fit, longest first)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        slot = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            rows.append([i])
            room.append(capacity - lengths[i])
        else:
            rows[slot].append(i)
            room[slot] -= lengths[i]
    return rows


def _collate_packed(
    examples: Sequence[Any], capacity: int, pad_id: int, device: str
) -> dict[str, Any]:
    """Examples packed into rows; each attends only to itself (a block-diagonal causal
    mask), positions restart per example, and the loss stays on its reply tokens."""
    import torch

    rows = pack_rows([len(ex.input_ids) for ex in examples], capacity)
    width = max(sum(len(examples[i].input_ids) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for k, i in enumerate(row):
            ex = examples[i]
            n = len(ex.input_ids)
            ids[r, at : at + n] = torch.tensor(ex.input_ids)
            labels[r, at : at + n] = torch.tensor(ex.labels)
            labels[r, at] = IGNORE_INDEX  # never predicted from the previous example
            positions[r, at : at + n] = torch.arange(n)
            segment[r, at : at + n] = k
            at += n
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
    # Padding rows attend to themselves only, so no softmax row is empty.
    same |= torch.eye(width, dtype=torch.bool)[None]
    return {
        "input_ids": ids.to(device),
        "attention_mask": (same & causal[None])[:, None].to(device),
        "position_ids": positions.to(device),
        "labels": labels.to(device),
    }


def _loss_sum(model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """Summed token loss over labelled positions, and how many there were.

    The output head runs on the labelled positions only: replies are a small share of
    each example, and the full-vocabulary logits of every position dominate the memory."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = base.get_decoder()(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch.get("position_ids"),
    )
    target = batch["labels"][:, 1:]
    keep = target != IGNORE_INDEX
    hidden = out.last_hidden_state[:, :-1][keep]
    logits = base.get_output_embeddings()(hidden).float()
    loss = torch.nn.functional.cross_entropy(logits, target[keep], reduction="sum")
    return loss, keep.sum()


def heldout_loss(
    model: Any, examples: Sequence[Any], *, pad_id: int, device: str, batch_size: int = 16
) -> float | None:
    """Mean per-token loss on the labelled tokens of ``examples`` (None when empty)."""
    import torch

    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        lengths = [len(ex.input_ids) for ex in examples]
        for idx in bucket_batches(lengths, batch_size):
            loss, n = _loss_sum(model, _collate([examples[i] for i in idx], pad_id, device))
            total += float(loss)
            count += int(n)
    if was_training:
        model.train()
    return total / count if count else None


def reduce_gradients(params: Sequence[Any], rank: Rank) -> None:
    """Sum the trainable parameters' gradients over the ranks (one flat all-reduce: LoRA
    gradients are small). A rank whose share of a step was empty adds zeros."""
    import torch
    import torch.distributed as dist

    if not rank.distributed:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    at = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[at : at + g.numel()].view_as(g).clone()
        at += g.numel()


def _reduced(value: float, device: str, rank: Rank) -> float:
    import torch
    import torch.distributed as dist

    if not rank.distributed:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total)


def run_sft(
    model: Any,
    examples: Sequence[Any],
    *,
    pad_id: int,
    device: str,
    total_steps: int,
    warmup_steps: int,
    learning_rate: float,
    schedule: str,
    batch_size: int,
    grad_accum_steps: int,
    max_grad_norm: float,
    weight_decay: float,
    seed: int,
    pack_tokens: int = 0,
    on_step: StepHook | None = None,
    progress_bar: bool = False,
    rank: Rank | None = None,
) -> LoopResult:
    """Train the trainable (LoRA) parameters for ``total_steps`` optimizer steps.

    With ``pack_tokens`` > 0 a micro-batch's examples are packed into rows of at most that
    many tokens (block-diagonal attention), so few, full rows replace many padded ones.
    Under ``torchrun`` (``rank`` of several) every rank makes the same batches and takes
    every world-th example of each; the gradients are summed over the ranks before the
    step, so the ranks stay equal and train as one process with the same batches would.
    ``tokens`` then counts every rank's."""
    import torch

    rank = rank or Rank()

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    lengths = [len(ex.input_ids) for ex in examples]
    model.train()
    history: list[dict[str, Any]] = []
    tokens = 0
    epoch = 0
    queue: list[list[int]] = []
    bar = None
    if progress_bar and rank.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, desc="train", unit="step")
    started = time.perf_counter()
    for step in range(total_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total_steps, warmup_steps, learning_rate, schedule)
        micro = []
        for _ in range(max(1, grad_accum_steps)):
            if not queue:
                queue = bucket_batches(lengths, batch_size, seed=seed, epoch=epoch)
                epoch += 1
            micro.append(queue.pop())
        labelled = sum(
            sum(1 for x in examples[i].labels[1:] if x != IGNORE_INDEX) for b in micro for i in b
        )
        step_loss = torch.zeros((), device=device)
        for idx in micro:
            chosen = [examples[i] for i in idx[rank.index :: rank.world]]
            if not chosen:
                continue
            if pack_tokens > 0:
                batch = _collate_packed(chosen, max(pack_tokens, max(lengths)), pad_id, device)
            else:
                batch = _collate(chosen, pad_id, device)
            loss, _n = _loss_sum(model, batch)
            # Every labelled token of the step weighs the same, whatever its micro-batch.
            (loss / max(1, labelled)).backward()
            step_loss += loss.detach()
            tokens += sum(len(ex.input_ids) for ex in chosen)
        reduce_gradients(params, rank)
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean = _reduced(float(step_loss), device, rank) / max(1, labelled)
        history.append({"stage": "sft", "step": step + 1, "loss": mean})
        if on_step is not None:
            on_step(step + 1, total_steps, mean)
        if bar is not None:
            bar.set_postfix(loss=f"{mean:.3f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    tokens = int(_reduced(float(tokens), device, rank))
    return LoopResult(total_steps, time.perf_counter() - started, tokens, history)
