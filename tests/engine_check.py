"""Shared by the GPU engine tests: greedy tokens vs an fp32 reference, teacher-forced."""

from __future__ import annotations

import torch


def check_against_reference(ref_model, prompt: list[int], generated: list[int], rel_tol: float = 1e-2) -> int:
    """Assert every generated token is the fp32 reference's argmax, or within bf16 noise of it.

    The reference runs once over prompt + generated (teacher forcing). A token counts as right when it is the
    argmax or its logit is within `rel_tol * max|logit|` of the maximum (near-ties that bf16 may flip).
    Returns the number of exact argmax matches.
    """
    dev = next(ref_model.parameters()).device
    seq = torch.tensor([prompt + generated], device=dev)
    with torch.no_grad():
        logits = ref_model(seq)[0, len(prompt) - 1: len(prompt) + len(generated) - 1].double()
    exact = 0
    for t, tok in enumerate(generated):
        row = logits[t]
        best = int(row.argmax())
        exact += best == tok
        gap = float(row[best] - row[tok])
        assert gap <= rel_tol * float(row.abs().max()), (
            f"step {t}: token {tok} has logit {float(row[tok]):.4f}, reference argmax {best} has "
            f"{float(row[best]):.4f}")
    return exact
