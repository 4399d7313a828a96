"""Loss and accuracy of a classifier: per epoch from summed batches, and over a whole image set (what the search and
the training evaluate with)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from cnn_darts.data import batches
from shared import distributed
from shared.loop import Meter


def accuracy_metrics(split: str, sums: dict[str, float]) -> dict[str, float]:
    """`{split}_loss` (mean cross entropy) and `{split}_acc` from sums of `loss`, `correct` and `images`."""
    return {f"{split}_loss": sums["loss"] / sums["images"], f"{split}_acc": sums["correct"] / sums["images"]}


def progress_postfix(sums: dict[str, float]) -> dict[str, str]:
    """The progress bar's loss and accuracy from an epoch's sums so far."""
    return {"loss": f"{sums['loss'] / sums['images']:.3f}", "acc": f"{sums['correct'] / sums['images']:.3f}"}


@torch.no_grad()
def classify(logits_of: Callable[[Tensor], Tensor], images: Tensor, labels: Tensor, batch_size: int, split: str
             ) -> dict[str, float]:
    """`{split}_loss` and `{split}_acc` of `logits_of` (B, 3, H, W) -> (B, classes) over uint8 `images`
    (N, 3, H, W), in order and unaugmented, the last batch included. Put the model in eval mode first. The processes
    of a distributed run each read every world_size-th image, and the sums are theirs together (`Meter`)."""
    processes = distributed.current()
    images, labels = images[processes.rank::processes.world_size], labels[processes.rank::processes.world_size]
    meter = Meter(check_every=len(labels) + 2)  # checked (summed over the processes) once, at the end: the
    # processes' shares may differ by one image, and so by one batch
    meter.add(loss=0.0, correct=0.0, images=0.0)  # every process sums the same names, even with no image
    for x, y in batches(images, labels, batch_size, torch.Generator(), shuffle=False, drop_last=False,
                        augment=False):
        logits = logits_of(x)
        meter.add(loss=F.cross_entropy(logits, y, reduction="sum"), correct=(logits.argmax(1) == y).sum(),
                  images=len(y))
    return accuracy_metrics(split, meter.check())
