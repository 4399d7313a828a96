"""Loss and accuracy of a classifier over a whole image set: what the search and the training evaluate with."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from cnn_darts.data import batches
from shared.loop import Meter


@torch.no_grad()
def classify(logits_of: Callable[[Tensor], Tensor], images: Tensor, labels: Tensor, batch_size: int
             ) -> dict[str, float]:
    """Mean cross entropy and accuracy of `logits_of` (B, 3, H, W) -> (B, classes) over uint8 `images` (N, 3, H, W),
    in order and unaugmented, the last batch included. Put the model in eval mode first."""
    meter = Meter()
    for x, y in batches(images, labels, batch_size, torch.Generator(), shuffle=False, drop_last=False,
                        augment=False):
        logits = logits_of(x)
        meter.add(loss=F.cross_entropy(logits, y, reduction="sum"), correct=(logits.argmax(1) == y).sum(),
                  images=len(y))
    sums = meter.check()
    return {"loss": sums["loss"] / sums["images"], "acc": sums["correct"] / sums["images"]}
