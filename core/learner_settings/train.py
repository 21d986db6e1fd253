"""LoRA training of each iteration's adapter (`learner.stages.train`, `learner.train`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["TrainSettings"]


@dataclass
class TrainSettings:
    # Each iteration retrains from the base on the cumulative selection, or continues.
    retrain_from: Literal["base", "parent"] = "base"
    # Rank 16 keeps a 135M model's adapter under 25 MB (the paper's 64 suits a 32B base).
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    learning_rate: float = 2e-4
    max_grad_norm: float = 0.3
    # Per-turn examples are short: batches of 8, 2 epochs, warm-up 10% (capped at 100),
    # cosine decay. 0 skips SFT: DPO alone from the base (needs dpo on).
    epochs: int = 2
    warmup_ratio: float = 0.1
    max_seq_len: int = 1024
    # > 0: pack each micro-batch into rows of this many tokens (fills a GPU; off on CPU).
    pack_tokens: int = 0
    train_batch_size: int = 8
    grad_accum_steps: int = 1
    max_warmup_steps: int = 100
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"
    dpo: bool = False
    dpo_learning_rate: float = 1e-5
    dpo_beta: float = 0.1
    # > 0: R-DPO's length term, against DPO learning length from length-biased pairs.
    dpo_length_alpha: float = 0.0
    # Drop the pairs whose chosen reply is longest relative to the rejected one until
    # chosen-longer and chosen-shorter pairs are equally many: no length signal is left.
    dpo_balance_length: bool = False
    # False: a rejected reply's end-of-turn is never a DPO label. Pushing it down teaches
    # "don't stop here" wherever a worse reply happened to stop, and replies run to the cap.
    dpo_rejected_turn_end: bool = False
    # >= 0: drop the pairs whose chosen reply is less related to the user's last message
    # than the rejected one by more than this (MiniLM cosine); < 0: keep every pair.
    dpo_relevance_margin: float = -1.0
    # > 0: add this weight x the chosen reply's mean token NLL to the DPO loss (RPO, Pang et
    # al., 2024). DPO alone can lower both replies' likelihood and move mass to text neither
    # holds (placeholders, role flips); the NLL term keeps the chosen reply likely.
    dpo_chosen_nll: float = 0.0
