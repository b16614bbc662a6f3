"""Knowledge distillation's objective: a student matches a teacher's next-token distributions.

    forward  (Hinton et al. 2015)   (1 - alpha) * CE(student, data) + alpha * T^2 * KL(p_teacher^T || p_student^T)
    reverse  (MiniLLM-style)        (1 - alpha) * CE(student, data) + alpha * KL(p_student || p_teacher), the KL
                                    taken at every position of continuations the student sampled itself

p^T is the softmax at temperature T; the T^2 factor keeps the soft term's gradients on the hard term's scale
as T grows (Hinton). Everything is summed over the scored tokens (the engine divides once per step).

With a cache (`TopK`), the teacher's top-k logits per position were computed once (lmstack.train.recipes.distill);
the teacher's distribution is then the softmax over those k logits, and the KL runs over that support
(the student's log-probabilities are still normalised over the whole vocabulary).

The reverse option's KL is token-level on the student's samples (its gradient flows through the student's
distribution at each position, not through the sampling): the variant MiniLLM starts from, without its
sequence-level policy-gradient term.

Shapes: B rows, T positions, V vocabulary, k cached logits per position.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import ConfigError
from lmstack.train.objectives.lm import IGNORE_INDEX
from lmstack.train.objectives.loss import Loss


@dataclass
class TopK:
    """Cached teacher logits: values (N, T, k) and vocabulary ids (N, T, k) for window n of the data."""

    values: torch.Tensor
    indices: torch.Tensor


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
               teacher_ids: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p_t^T || p_s^T) per position (B, T). teacher_logits (B, T, V), or (B, T, k) at `teacher_ids` (B, T, k)."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, T, V)
    if teacher_ids is not None:
        log_s = log_s.gather(-1, teacher_ids.long())  # (B, T, k): the student's mass on the teacher's top k
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_s || p_t) per position (B, T), both (B, T, V)."""
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    log_t = F.log_softmax(teacher_logits.float(), dim=-1)
    return (log_s.exp() * (log_s - log_t)).sum(-1)


def check_vocabularies(teacher: nn.Module, student: nn.Module) -> None:
    vt, vs = teacher.config.vocab_size, student.config.vocab_size
    if vt != vs:
        raise ConfigError(f"the teacher's vocabulary has {vt} tokens and the student's {vs}: distillation compares "
                          "their next-token distributions id by id, so both need the same tokenizer")


def distill_objective(teacher: nn.Module | None, temperature: float = 2.0, alpha: float = 0.5,
                      kind: str = "forward", cache: TopK | None = None,
                      sample: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
                      ) -> Callable[[nn.Module, dict], Loss]:
    """objective(student, batch) for the engine. batch: input_ids, targets (B, T) and, with a cache, window (B,).
    In eval mode (the engine's validation) it is the student's plain cross-entropy, so val loss is its perplexity.

    kind "reverse" needs the live teacher and `sample(student, input_ids) -> (ids (B, T'), scored (B, T'))`: the
    student's continuations and which of their positions to score."""
    if not 0.0 <= alpha <= 1.0 or temperature <= 0:
        raise ConfigError(f"distill: alpha must be in [0, 1] and temperature positive (got {alpha}, {temperature})")
    if kind == "reverse" and (teacher is None or sample is None):
        raise ConfigError("distill.kind = reverse scores the student's own samples: it needs the live teacher "
                          "(no top-k cache)")
    if teacher is None and cache is None and alpha > 0:
        raise ConfigError("distill: alpha > 0 needs a teacher or its cached top-k logits")

    def objective(student: nn.Module, batch: dict) -> Loss:
        inputs, targets = batch["input_ids"], batch["targets"]
        scored = targets != IGNORE_INDEX  # (B, T)
        logits = student(inputs)  # (B, T, V)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                             reduction="sum")
        metrics: dict[str, torch.Tensor] = {"ce": ce.detach()}
        if alpha == 0 or not student.training:  # evaluation: the student's own cross-entropy (its perplexity)
            return Loss(ce, scored.sum(), metrics)
        if kind == "forward":
            if cache is not None:
                window = batch["window"].cpu()
                values = cache.values[window].to(logits.device)  # (B, T, k)
                ids = cache.indices[window].to(logits.device)
                kl = forward_kl(logits, values, temperature, ids)
            else:
                with torch.no_grad():
                    teacher_logits = teacher(inputs)
                kl = forward_kl(logits, teacher_logits, temperature)
            soft = temperature**2 * (kl * scored).sum()
        else:
            with torch.no_grad():
                samples, sample_scored = sample(student, inputs)  # (B, T'), (B, T')
                teacher_logits = teacher(samples)
            kl = reverse_kl(student(samples), teacher_logits)
            # per scored token of the sampled part, rescaled to the data's token count so alpha weighs like-for-like
            soft = (kl * sample_scored).sum() * scored.sum() / sample_scored.sum().clamp(min=1)
        metrics["kl"] = soft.detach()
        return Loss((1 - alpha) * ce + alpha * soft, scored.sum(), metrics)

    return objective


__all__ = ["TopK", "check_vocabularies", "distill_objective", "forward_kl", "reverse_kl"]
