"""Fine-tune a LoRA adapter on the curriculum's selected replies (SFT, then optional DPO).

Plain PyTorch loops (`learner/sft_loop.py`, `learner/dpo_loop.py`) over examples built in
`learner/sft_data.py`, with the loss on reply tokens only. On CUDA a small base trains in
bf16 LoRA; a base over 2 GiB loads in 4-bit NF4 (QLoRA). On CPU it trains fp32 LoRA. Each
iteration retrains from the base on the cumulative selection by default, or continues from
the parent adapter, loaded trainable.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import resource
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.devices import worth_quantizing
from core.embeddings import Embedder
from core.learner_settings.train import TrainSettings
from core.prompting import load_prompt
from learner.distributed import current_rank
from learner.dpo_loop import DpoPair, balance_lengths, run_dpo
from learner.pair_filters import drifting_pairs
from learner.sft_data import (
    IGNORE_INDEX,
    TokenizedExample,
    TrainingDataError,
    build_example,
    load_pairs,
    load_sft_dialogues,
    tokenize_all,
    without_turn_end,
)
from learner.sft_loop import StepHook, heldout_loss, run_sft
from learner.train_status import TrainingStatus, TrainingStatusStore

__all__ = [
    "IGNORE_INDEX",
    "TokenizedExample",
    "TrainConfig",
    "TrainResult",
    "TrainingDataError",
    "TrainingStatus",
    "TrainingStatusStore",
    "build_example",
    "dpo_pairs",
    "load_pairs",
    "load_sft_dialogues",
    "plan_steps",
    "save_loss_curve",
    "train_adapter",
]

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Every knob of a training run; defaults follow the method's reference (section 4)."""

    lora_rank: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    learning_rate: float = 2e-4
    lr_scheduler: str = "constant_with_warmup"
    max_grad_norm: float = 0.3
    weight_decay: float = 0.0
    epochs: int = 1
    # > 0 overrides the epoch count (tests, benchmarks).
    max_steps: int = -1
    batch_size: int = 1
    grad_accum_steps: int = 2
    # Warm-up = warmup_ratio of the optimizer steps, capped at the reference's 100.
    warmup_ratio: float = 0.1
    max_warmup_steps: int = 100
    max_seq_len: int = 1024
    # > 0: a micro-batch's examples are packed into rows of this many tokens.
    pack_tokens: int = 0
    seed: int = 42
    device: str = "auto"
    load_in_4bit: bool = True  # CUDA only
    gradient_checkpointing: bool | None = None  # None: on for CUDA, off on CPU
    dpo: bool = False
    dpo_learning_rate: float = 1e-5
    dpo_beta: float = 0.1
    dpo_epochs: int = 1
    dpo_length_alpha: float = 0.0
    dpo_balance_length: bool = False
    dpo_rejected_turn_end: bool = False
    dpo_relevance_margin: float = -1.0
    dpo_chosen_nll: float = 0.0

    @classmethod
    def from_settings(cls, learner: TrainSettings, **overrides: Any) -> TrainConfig:
        """Build from `settings.learner.train`, then apply overrides."""
        values = {
            "lora_rank": learner.lora_rank,
            "lora_alpha": learner.lora_alpha,
            "lora_dropout": learner.lora_dropout,
            "learning_rate": learner.learning_rate,
            "lr_scheduler": learner.lr_scheduler,
            "max_grad_norm": learner.max_grad_norm,
            "weight_decay": learner.weight_decay,
            "epochs": learner.epochs,
            "batch_size": learner.train_batch_size,
            "grad_accum_steps": learner.grad_accum_steps,
            "warmup_ratio": learner.warmup_ratio,
            "max_warmup_steps": learner.max_warmup_steps,
            "max_seq_len": learner.max_seq_len,
            "pack_tokens": learner.pack_tokens,
            "dpo": learner.dpo,
            "dpo_learning_rate": learner.dpo_learning_rate,
            "dpo_beta": learner.dpo_beta,
            "dpo_length_alpha": learner.dpo_length_alpha,
            "dpo_balance_length": learner.dpo_balance_length,
            "dpo_rejected_turn_end": learner.dpo_rejected_turn_end,
            "dpo_relevance_margin": learner.dpo_relevance_margin,
            "dpo_chosen_nll": learner.dpo_chosen_nll,
        }
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def sft_on(self) -> bool:
        """False: no SFT step, DPO alone (`epochs` 0 and no `max_steps`)."""
        return self.epochs > 0 or self.max_steps > 0


@dataclass
class TrainResult:
    adapter_dir: Path
    run_id: str
    device: str
    examples: int
    dialogue_ids: list[str]
    steps: int
    warmup_steps: int
    tokens: int
    label_tokens: int
    train_seconds: float
    tokens_per_s: float
    final_loss: float | None
    peak_memory_mb: float
    loss_history: list[dict[str, Any]] = field(default_factory=list)
    dpo: dict[str, Any] | None = None
    parent_dir: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    # The trained PeftModel, only when `train_adapter(keep_model=True)` (tests, benchmarks).
    model: Any = field(default=None, repr=False)
    heldout_examples: int = 0
    heldout_loss_before: float | None = None
    heldout_loss: float | None = None
    # Tokens run through the model over all steps and ranks, and how many ranks trained.
    tokens_trained: int = 0
    ranks: int = 1

    def metrics(self) -> dict[str, Any]:
        """What goes into the adapter manifest."""
        out = {
            "device": self.device,
            "examples": self.examples,
            "steps": self.steps,
            "warmup_steps": self.warmup_steps,
            "tokens": self.tokens,
            "label_tokens": self.label_tokens,
            "train_seconds": round(self.train_seconds, 3),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "tokens_trained": self.tokens_trained,
            "ranks": self.ranks,
            "final_loss": self.final_loss,
            "peak_memory_mb": round(self.peak_memory_mb, 1),
            "heldout_examples": self.heldout_examples,
            "heldout_loss_before": _round(self.heldout_loss_before),
            "heldout_loss": _round(self.heldout_loss),
        }
        if self.dpo is not None:
            out["dpo"] = self.dpo
        return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _status_hook(store: TrainingStatusStore | None, run_id: str) -> StepHook | None:
    """Mirror each optimizer step into the status row, at most once a second."""
    if store is None:
        return None
    last = [0.0]

    def hook(step: int, total: int, loss: float) -> None:
        now = time.monotonic()
        if now - last[0] >= 1.0 or step >= total:
            last[0] = now
            store.update(run_id, step=step, loss=loss)

    return hook


def plan_steps(n_examples: int, config: TrainConfig) -> tuple[int, int]:
    """(optimizer steps, warm-up steps) for a dataset of `n_examples` conversations."""
    per_step = max(1, config.batch_size * config.grad_accum_steps)
    steps = (
        config.max_steps
        if config.max_steps > 0
        else (max(1, math.ceil(n_examples / per_step)) * max(1, config.epochs))
    )
    warmup = min(config.max_warmup_steps, math.floor(config.warmup_ratio * steps))
    return steps, max(0, warmup)


# --------------------------------------------------------------------------- model
def _pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _load_model(base_model: str | Path, device: str, config: TrainConfig) -> tuple[Any, bool]:
    import torch
    from transformers import AutoModelForCausalLM

    # bf16 LoRA for small bases; QLoRA only where the base would not fit otherwise.
    quantized = device.startswith("cuda") and config.load_in_4bit and worth_quantizing(base_model)
    if quantized:
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        model = AutoModelForCausalLM.from_pretrained(
            str(base_model),
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=torch.bfloat16,
                bnb_4bit_use_double_quant=True,
            ),
            dtype=torch.bfloat16,
            device_map={"": device},
        )
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=_checkpointing(config, device)
        )
    else:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=dtype)
        model.to(device)
    model.config.use_cache = False
    return model, quantized


def _checkpointing(config: TrainConfig, device: str) -> bool:
    if config.gradient_checkpointing is None:
        return device.startswith("cuda")
    return config.gradient_checkpointing


def _peak_memory_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def save_loss_curve(history: list[dict[str, Any]], out_dir: Path) -> None:
    """`loss.json` and `loss.png` next to the adapter files."""
    (out_dir / "loss.json").write_text(json.dumps(history, indent=1), encoding="utf-8")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for stage in sorted({h["stage"] for h in history}):
        points = [(h["step"], h["loss"]) for h in history if h["stage"] == stage]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=stage)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("training loss")
    if history:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png")
    plt.close(fig)


# --------------------------------------------------------------------------- training
def _loop_settings(config: TrainConfig) -> dict[str, Any]:
    """The SFT loop's knobs from the training config."""
    return {
        "learning_rate": config.learning_rate,
        "schedule": config.lr_scheduler,
        "batch_size": config.batch_size,
        "grad_accum_steps": config.grad_accum_steps,
        "max_grad_norm": config.max_grad_norm,
        "weight_decay": config.weight_decay,
        "seed": config.seed,
        "pack_tokens": config.pack_tokens,
    }


def _training_data(
    base_model: str | Path,
    sft_path: Path | None,
    heldout_path: Path | None,
    pairs_path: Path | None,
    config: TrainConfig,
    system_prompt: str,
) -> tuple[Any, list[TokenizedExample], list[TokenizedExample], list[dict[str, Any]]]:
    """The tokenizer, the SFT and held-out examples, and the DPO pairs (when DPO is on)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_model))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # DPO alone on recorded pairs (`upc learn train --pairs`) has no SFT set.
    examples = (
        tokenize_all(
            tokenizer, load_sft_dialogues(Path(sft_path), system_prompt), config.max_seq_len
        )
        if sft_path is not None
        else []
    )
    heldout = (
        tokenize_all(
            tokenizer, load_sft_dialogues(Path(heldout_path), system_prompt), config.max_seq_len
        )
        if heldout_path is not None and Path(heldout_path).is_file()
        else []
    )
    if not examples and sft_path is not None:
        raise TrainingDataError(f"{sft_path} holds no dialogue with an assistant reply to learn")
    pairs = (
        load_pairs(Path(pairs_path), system_prompt)
        if config.dpo and pairs_path is not None and Path(pairs_path).is_file()
        else []
    )
    if not config.sft_on and not pairs:
        raise TrainingDataError("epochs 0 trains DPO alone, and there are no preference pairs")
    if config.sft_on and not examples:
        raise TrainingDataError("SFT needs examples: pairs alone train with learner.epochs = 0")
    return tokenizer, examples, heldout, pairs


def _trainable_model(
    base_model: str | Path, device: str, config: TrainConfig, parent_adapter_dir: Path | None
) -> tuple[Any, bool]:
    """The base with a trainable LoRA: the parent's (its shape kept) or a fresh one."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    model, quantized = _load_model(base_model, device, config)
    if torch.cuda.is_available() and device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if parent_adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(parent_adapter_dir), is_trainable=True)
    else:
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=config.target_modules,
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    if _checkpointing(config, device):
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    return model, quantized


def train_adapter(
    base_model: str | Path,
    sft_path: Path | None,
    output_dir: Path,
    config: TrainConfig,
    *,
    system_prompt: str | None = None,
    parent_adapter_dir: Path | None = None,
    pairs_path: Path | None = None,
    status: TrainingStatusStore | None = None,
    run_id: str | None = None,
    iteration: int | None = None,
    adapter_id: str | None = None,
    progress_bar: bool = False,
    keep_model: bool = False,
    heldout_path: Path | None = None,
) -> TrainResult:
    """Train one adapter into `output_dir` (PEFT safetensors + loss.json + loss.png), from
    `parent_adapter_dir` if given; held-out loss before and after; DPO after SFT with
    `config.dpo` and a non-empty `pairs_path`."""
    import torch

    if system_prompt is None:
        system_prompt = str(load_prompt("upc_system"))
    run_id = run_id or uuid.uuid4().hex
    device = _pick_device(config.device)
    # Under torchrun every rank trains its share of each batch (learner.sft_loop); the
    # first rank alone reports, runs DPO (not sharded) and writes the adapter.
    rank = current_rank()
    status = status if rank.main else None
    tokenizer, examples, heldout, pairs = _training_data(
        base_model, sft_path, heldout_path, pairs_path, config, system_prompt
    )
    total_steps, warmup = plan_steps(len(examples), config) if config.sft_on else (0, 0)
    if status is not None:
        status.start(run_id, iteration=iteration, adapter_id=adapter_id, total_steps=total_steps)
    output_dir = Path(output_dir)
    if rank.main:
        output_dir.mkdir(parents=True, exist_ok=True)
    history: list[dict[str, Any]] = []
    try:
        torch.manual_seed(config.seed)
        model, quantized = _trainable_model(base_model, device, config, parent_adapter_dir)
        pad_id = tokenizer.pad_token_id
        before = heldout_loss(model, heldout, pad_id=pad_id, device=device)
        if status is not None:
            status.update(run_id, stage="sft", step=0, total_steps=total_steps)
        train_seconds, seen = 0.0, 0
        if config.sft_on:
            loop = run_sft(
                model, examples, pad_id=pad_id, device=device, total_steps=total_steps,
                warmup_steps=warmup, **_loop_settings(config), rank=rank,
                on_step=_status_hook(status, run_id), progress_bar=progress_bar,
            )  # fmt: skip
            history.extend(loop.loss_history)
            train_seconds, seen = loop.seconds, loop.tokens
        after = heldout_loss(model, heldout, pad_id=pad_id, device=device)
        dpo_metrics = (
            _train_dpo(model, tokenizer, pairs, config, device, status, run_id, history)
            if pairs and rank.main
            else None
        )
        tokens = sum(len(ex.input_ids) for ex in examples)
        if rank.main:
            model.save_pretrained(str(output_dir), selected_adapters=["default"])
            save_loss_curve(history, output_dir)
    except Exception as exc:
        if status is not None:
            status.update(run_id, status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    losses = [h["loss"] for h in history if h["stage"] == "sft"]
    result = TrainResult(
        adapter_dir=output_dir,
        run_id=run_id,
        device=device + (" (4-bit NF4)" if quantized else ""),
        examples=len(examples),
        dialogue_ids=[ex.dialogue_id for ex in examples],
        steps=total_steps,
        warmup_steps=warmup,
        tokens=tokens,
        label_tokens=sum(ex.label_tokens for ex in examples),
        train_seconds=train_seconds,
        tokens_per_s=seen / train_seconds if train_seconds > 0 else 0.0,
        final_loss=losses[-1] if losses else None,
        peak_memory_mb=_peak_memory_mb(device),
        loss_history=history,
        dpo=dpo_metrics,
        parent_dir=str(parent_adapter_dir) if parent_adapter_dir else None,
        config=config.to_dict(),
        model=model if keep_model else None,
        heldout_examples=len(heldout),
        heldout_loss_before=before,
        heldout_loss=after,
        tokens_trained=seen,
        ranks=rank.world,
    )
    _report_done(status, result)
    return result


def _report_done(status: TrainingStatusStore | None, result: TrainResult) -> None:
    if status is not None:
        status.update(result.run_id, status="done", step=result.steps)
    log.info("trained %d examples, %d steps, %.0f tokens/s on %s, final loss %s",
             result.examples, result.steps, result.tokens_per_s, result.device,
             result.final_loss)  # fmt: skip


def dpo_pairs(
    tokenizer: Any, pairs: list[dict[str, Any]], config: TrainConfig
) -> tuple[list[DpoPair], int]:
    """Tokenized pairs with labels on each reply (the rejected one without its end-of-turn
    unless `dpo_rejected_turn_end`), length-balanced if configured; and how many were built
    before balancing (pairs too long for max_seq_len are left out)."""
    examples = []
    for k, pair in enumerate(pairs):
        made = [
            build_example(
                tokenizer, f"pair-{k}", [*pair["prompt"], *pair[side]], config.max_seq_len,
                last_only=True,
            )
            for side in ("chosen", "rejected")
        ]  # fmt: skip
        if made[0] is not None and made[1] is not None:
            # A capped rejected reply never ended; any other one ended where it stopped,
            # but unlearning that end teaches running on (dpo_rejected_turn_end).
            keep_end = config.dpo_rejected_turn_end and not pair.get("rejected_capped")
            rejected = made[1] if keep_end else without_turn_end(made[1])
            examples.append(DpoPair(made[0], rejected))
    built = len(examples)
    if config.dpo_balance_length:
        examples = balance_lengths(examples)
    return examples, built


def _train_dpo(
    model: Any,
    tokenizer: Any,
    pairs: list[dict[str, Any]],
    config: TrainConfig,
    device: str,
    status: TrainingStatusStore | None,
    run_id: str,
    history: list[dict[str, Any]],
) -> dict[str, Any]:
    """DPO on the recorded pairs (chosen = best attempt, rejected = worst) after SFT, with
    the SFT policy as the reference. Plain torch (learner.dpo_loop): no trl needed."""
    offered, drifting = len(pairs), 0
    if config.dpo_relevance_margin >= 0:
        flags = drifting_pairs(pairs, Embedder(), config.dpo_relevance_margin)
        drifting = sum(flags)
        pairs = [p for p, drifts in zip(pairs, flags, strict=True) if not drifts]
        log.info("DPO: %d of %d pairs drop for drifting from the user", drifting, len(flags))
    examples, built = dpo_pairs(tokenizer, pairs, config)
    if not examples and not config.sft_on:
        # DPO alone with nothing to learn would publish the base under a new id.
        raise TrainingDataError(
            f"DPO alone, and none of the {offered} preference pairs is left to train on"
            " (too long, or dropped by learner.dpo_balance_length or"
            " learner.dpo_relevance_margin)"
        )
    if not examples:
        return {
            "pairs": 0,
            "pairs_dropped_for_length": built,
            "pairs_dropped_for_drift": drifting,
            "steps": 0,
        }
    dpo_config = dataclasses.replace(
        config, max_steps=-1, epochs=config.dpo_epochs, learning_rate=config.dpo_learning_rate
    )
    steps, warmup = plan_steps(len(examples), dpo_config)
    if status is not None:
        status.update(run_id, stage="dpo", step=0, total_steps=steps)
    result = run_dpo(
        model,
        examples,
        pad_id=tokenizer.pad_token_id,
        device=device,
        beta=config.dpo_beta,
        learning_rate=dpo_config.learning_rate,
        total_steps=steps,
        warmup_steps=warmup,
        schedule=config.lr_scheduler,
        batch_size=max(1, config.batch_size // 2),  # a pair is two sequences
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        on_step=_status_hook(status, run_id),
        length_alpha=config.dpo_length_alpha,
        chosen_nll=config.dpo_chosen_nll,
    )
    history.extend(result.loss_history)
    return {
        "pairs": len(examples),
        "pairs_dropped_for_length": built - len(examples),
        "pairs_dropped_for_drift": drifting,
        "mean_length_gap": round(sum(p.length_gap for p in examples) / len(examples), 2),
        "steps": result.steps,
        "seconds": round(result.seconds, 3),
        "train_loss": result.loss_history[-1]["loss"] if result.loss_history else None,
        "pair_accuracy": round(result.accuracy, 4),
        "mean_margin": round(result.mean_margin, 4),
    }
