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
  sets by descending attention, ties toward the lower row index;
- `attention` ("self") and `decoder_layers` (the decoder layer of each layer index: all, in order).

Llama-3.2-Vision (`build_cross_report`, `attention` "cross"): its image is not in the sequence but
cross-attended, so l runs over its cross-attention layers (`decoder_layers`: their indices in the
decoder) and A_x[t, l] is the head-mean cross-attention of step t's query row over the layer's
image feature rows (images x tiles x patches, in order), 0 on the rows the row may not attend
(padding tiles, as the model masks them). The image rows of `concentration` and PPCI are the
feature rows the query rows attend, N_img their count (`n_image`); `modal_shares` is None (the
sequence holds no image rows whose share it could be).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from avl.cache.layout import Modality, top_rows

MODALITIES = ("system", "image", "instruction", "generated")


@dataclass(frozen=True)
class AttentionReport:
    """The attention analysis of one generation, or the mean over samples (`AttentionReport.mean`).

    Lists are indexed [step t][layer l] except `ppci_layers` [l] and `ppci_steps` [l][t]. `n_image`
    is N_img (a mean over samples in a mean report); `tokens` the generated ids (empty in a mean
    report, which covers `samples` generations). `attention`: "self" (decoder layers over the
    sequence rows) or "cross" (Llama-3.2-Vision's cross-attention layers over the image feature
    rows; `modal_shares` None); `decoder_layers`: the decoder layer of each layer index l.
    """

    tokens: list[int]
    modal_shares: list[dict[str, float]] | None
    concentration: list[list[float]]
    ppci_layers: list[float]
    ppci_steps: list[list[float]]
    n_image: float
    top: float
    mass: float
    samples: int = 1
    attention: Literal["self", "cross"] = "self"
    decoder_layers: list[int] | None = None

    @property
    def steps(self) -> int:
        return len(self.concentration)

    @property
    def layers(self) -> int:
        return len(self.ppci_layers)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (the keys are the field names)."""
        return asdict(self)

    @classmethod
    def mean(cls, reports: Sequence[AttentionReport]) -> AttentionReport:
        """The element-wise mean of reports with the same steps, layers, `top`, `mass`, `attention`
        and `decoder_layers`."""
        if not reports:
            raise ValueError("no reports to average")
        first = reports[0]

        def shape(r: AttentionReport) -> tuple:
            return r.steps, r.layers, r.top, r.mass, r.attention, r.decoder_layers

        for r in reports[1:]:
            if shape(r) != shape(first):
                raise ValueError(f"cannot average reports of {r.steps} steps x {r.layers} layers (top={r.top}, "
                                 f"mass={r.mass}, attention={r.attention!r}, decoder_layers={r.decoder_layers}) "
                                 f"with {first.steps} x {first.layers} (top={first.top}, mass={first.mass}, "
                                 f"attention={first.attention!r}, decoder_layers={first.decoder_layers})")

        def average(name: str) -> Tensor:
            return torch.tensor([getattr(r, name) for r in reports], dtype=torch.float64).mean(0)

        shares = None
        if first.modal_shares is not None:
            mean = torch.tensor([[[s[m] for m in MODALITIES] for s in r.modal_shares] for r in reports],
                                dtype=torch.float64).mean(0)
            shares = [dict(zip(MODALITIES, row)) for row in mean.tolist()]
        return cls(
            tokens=[],
            modal_shares=shares,
            concentration=average("concentration").tolist(),
            ppci_layers=average("ppci_layers").tolist(),
            ppci_steps=average("ppci_steps").tolist(),
            n_image=float(average("n_image")),
            top=first.top,
            mass=first.mass,
            samples=sum(r.samples for r in reports),
            attention=first.attention,
            decoder_layers=first.decoder_layers,
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


def image_quantities(image_probs: Tensor, top: float, mass: float) -> dict[str, list]:
    """`concentration`, `ppci_layers` and `ppci_steps` of the image rows' attention
    image_probs [T, layers, N_img] (float64)."""
    k_top = top_count(top, image_probs.shape[-1])
    everything = torch.ones(image_probs.shape, dtype=torch.bool)
    tops = top_rows(image_probs, everything, torch.tensor(k_top))  # [T, layers, N_img]
    ppci_layers = (tops[0, :1] & tops[0]).sum(-1).double() / k_top  # [layers]
    ppci_steps = (tops[:1] & tops).sum(-1).double().T / k_top  # [layers, T]
    return {"concentration": concentration(image_probs, mass).tolist(), "ppci_layers": ppci_layers.tolist(),
            "ppci_steps": ppci_steps.tolist()}


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
    return AttentionReport(tokens=tokens, modal_shares=shares, **image_quantities(image_probs, top, mass),
                           n_image=float(n_image), top=top, mass=mass, decoder_layers=list(range(len(attention[0]))))


def build_cross_report(attention: Sequence[Tensor], allowed: Tensor | None, tokens: list[int], top: float, mass: float,
                       layers: Sequence[int]) -> AttentionReport:
    """The report of one generation over cross-attention layers (Llama-3.2-Vision).

    attention: per step t, A_x[t] [cross layers, N] float64 over the feature rows; allowed [N]: the
    feature rows the query rows attend (the image rows here; None: nothing was recorded); layers:
    the cross-attention layers' indices in the decoder.
    """
    if allowed is None:
        raise ValueError("the cross-attention layers attended no image feature rows: the analysis needs an image")
    image_probs = torch.stack([a[:, allowed] for a in attention])  # [T, layers, N_img]
    return AttentionReport(tokens=tokens, modal_shares=None, **image_quantities(image_probs, top, mass),
                           n_image=float(allowed.sum()), top=top, mass=mass, attention="cross",
                           decoder_layers=list(layers))
