"""The analysis report: modal shares, concentration and PPCI from recorded attention A[t, l].

`A[t, l]` is the head-mean attention of step t's query row in decoder layer l over every row up to
and including itself (step 0: the prompt's last row; step t >= 1: the t-th generated token's row).
The quantities (the JSON keys of `AttentionReport.to_dict`):

- `modal_shares[t]`: per modality ("system", "image", "instruction", "generated"), the mean over
  layers of A[t, l] summed over that modality's rows;
- `concentration[t][l]`: the smallest k such that the k image rows with the highest A[t, l] hold at
  least `mass` of A[t, l]'s image total, divided by N_img;
- `ppci_layers[l]`: |top(A_img[0, 0]) ∩ top(A_img[0, l])| / k_top and `ppci_steps[l][t]`:
  |top(A_img[0, l]) ∩ top(A_img[t, l])| / k_top, with k_top = max(1, floor(top * N_img)) and top-k
  sets by descending attention, ties toward the lower row index.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from avl.cache.layout import Modality, top_rows

MODALITIES = ("system", "image", "instruction", "generated")


@dataclass(frozen=True)
class AttentionReport:
    """The attention analysis of one generation, or the mean over samples (`AttentionReport.mean`).

    Lists are indexed [step t][layer l] except `ppci_layers` [l] and `ppci_steps` [l][t]. `n_image`
    is N_img (a mean over samples in a mean report); `tokens` the generated ids (empty in a mean
    report, which covers `samples` generations).
    """

    tokens: list[int]
    modal_shares: list[dict[str, float]]
    concentration: list[list[float]]
    ppci_layers: list[float]
    ppci_steps: list[list[float]]
    n_image: float
    top: float
    mass: float
    samples: int = 1

    @property
    def steps(self) -> int:
        return len(self.modal_shares)

    @property
    def layers(self) -> int:
        return len(self.ppci_layers)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (the keys are the field names)."""
        return asdict(self)

    @classmethod
    def mean(cls, reports: Sequence[AttentionReport]) -> AttentionReport:
        """The element-wise mean of reports with the same steps, layers, `top` and `mass`."""
        if not reports:
            raise ValueError("no reports to average")
        first = reports[0]
        for r in reports[1:]:
            if (r.steps, r.layers, r.top, r.mass) != (first.steps, first.layers, first.top, first.mass):
                raise ValueError(f"cannot average reports of {r.steps} steps x {r.layers} layers (top={r.top}, "
                                 f"mass={r.mass}) with {first.steps} x {first.layers} (top={first.top}, "
                                 f"mass={first.mass})")

        def average(name: str) -> Tensor:
            return torch.tensor([getattr(r, name) for r in reports], dtype=torch.float64).mean(0)

        shares = torch.tensor([[[s[m] for m in MODALITIES] for s in r.modal_shares] for r in reports],
                              dtype=torch.float64).mean(0)
        return cls(
            tokens=[],
            modal_shares=[dict(zip(MODALITIES, row)) for row in shares.tolist()],
            concentration=average("concentration").tolist(),
            ppci_layers=average("ppci_layers").tolist(),
            ppci_steps=average("ppci_steps").tolist(),
            n_image=float(average("n_image")),
            top=first.top,
            mass=first.mass,
            samples=sum(r.samples for r in reports),
        )


def top_count(top: float, n_image: int) -> int:
    """k_top = max(1, floor(top * N_img))."""
    return max(1, math.floor(top * n_image))


def concentration(image_probs: Tensor, mass: float) -> Tensor:
    """The share of image rows needed to hold `mass` of the image attention: image_probs [..., N] -> [...]."""
    ordered = image_probs.sort(dim=-1, descending=True).values
    cumulative = ordered.cumsum(-1)
    needed = (cumulative < mass * cumulative[..., -1:]).sum(-1) + 1
    n = image_probs.shape[-1]
    return needed.clamp(max=n).to(torch.float64) / n


def build_report(attention: Sequence[Tensor], modality: Tensor, tokens: list[int], top: float,
                 mass: float) -> AttentionReport:
    """The report of one generation.

    attention: per step t, A[t] [layers, L + t] float64 over the sequence rows (prompt rows, then
    the generated tokens' rows); modality: the prompt rows' `Modality` [L]; tokens: the generated ids.
    """
    prompt_rows = modality.shape[0]
    image = (modality == Modality.IMAGE).nonzero()[:, 0]
    n_image = image.numel()
    if n_image == 0:
        raise ValueError("the prompt has no image rows: the analysis needs an image in the sequence")
    masks = {"system": modality == Modality.SYSTEM, "image": modality == Modality.IMAGE,
             "instruction": modality == Modality.TEXT}
    shares = []
    for a in attention:
        sums = {name: a[:, :prompt_rows][:, mask].sum(-1) for name, mask in masks.items()}
        sums["generated"] = a[:, prompt_rows:].sum(-1)
        shares.append({name: float(sums[name].mean()) for name in MODALITIES})
    image_probs = torch.stack([a[:, image] for a in attention])  # [T, layers, N_img]
    k_top = top_count(top, n_image)
    everything = torch.ones(image_probs.shape, dtype=torch.bool)
    tops = top_rows(image_probs, everything, torch.tensor(k_top))  # [T, layers, N_img]
    ppci_layers = (tops[0, :1] & tops[0]).sum(-1).double() / k_top  # [layers]
    ppci_steps = (tops[:1] & tops).sum(-1).double().T / k_top  # [layers, T]
    return AttentionReport(
        tokens=tokens,
        modal_shares=shares,
        concentration=concentration(image_probs, mass).tolist(),
        ppci_layers=ppci_layers.tolist(),
        ppci_steps=ppci_steps.tolist(),
        n_image=float(n_image),
        top=top,
        mass=mass,
    )
