"""Token-summed losses; the loop divides by the global batch's target-token count.

Summing here and normalising once per global batch makes the loss per token
independent of how the batch is cut: micro batches, data-parallel ranks,
padding or packing all give the same number.

`labels_shifted`: the labels already hold each position's next token (context
parallel shifts them before splitting a row over ranks), so no shift is done here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kubetune_trainer.data.formatting import IGNORE_INDEX


@dataclass
class LossParts:
    total: torch.Tensor  # what backward runs on (summed over tokens)
    ce_sum: torch.Tensor
    kd_sum: torch.Tensor | None


def shift(
    logits: torch.Tensor, labels: torch.Tensor, labels_shifted: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    if labels_shifted:
        return logits.float(), labels
    return logits[:, :-1, :].float(), labels[:, 1:]


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, labels_shifted: bool = False) -> torch.Tensor:
    shifted_logits, shifted_labels = shift(logits, labels, labels_shifted)
    return F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def kl_teacher_student_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    labels_shifted: bool = False,
) -> torch.Tensor:
    """sum over target tokens of KL(p_teacher || p_student), both softened by the temperature."""
    student, shifted_labels = shift(student_logits, labels, labels_shifted)
    teacher, _ = shift(teacher_logits, labels, labels_shifted)
    mask = shifted_labels != IGNORE_INDEX
    log_p_student = F.log_softmax(student[mask] / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher[mask] / temperature, dim=-1)
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum()


def sft_or_distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    ratio: float,
    temperature: float,
    labels_shifted: bool = False,
) -> LossParts:
    """(1 - ratio) * CE + ratio * T^2 * KL(teacher || student), summed over target tokens.

    T^2 keeps the KD gradient's scale independent of T (Hinton et al., 2015).
    """
    ce = cross_entropy_sum(student_logits, labels, labels_shifted)
    if teacher_logits is None:
        return LossParts(total=ce, ce_sum=ce, kd_sum=None)
    if teacher_logits.shape[-1] != student_logits.shape[-1]:
        raise ValueError(
            f"teacher logits have {teacher_logits.shape[-1]} classes, student {student_logits.shape[-1]}; "
            "distillation needs the same vocabulary"
        )
    kd = kl_teacher_student_sum(student_logits, teacher_logits, labels, temperature, labels_shifted)
    total = (1.0 - ratio) * ce + ratio * temperature**2 * kd
    return LossParts(total=total, ce_sum=ce, kd_sum=kd)
