"""Stop a run on the first NaN or infinite loss, naming the term that caused it."""

import torch
import torch.distributed as dist

from ...system import distributed
from ...system.errors import UserError

__all__ = ["TOTAL_LOSSES", "NonFiniteLossError", "check_finite"]

# Sums of other recorded terms: non-finite whenever one of their terms is, so never named as the cause.
TOTAL_LOSSES = ("loss_G", "loss_S")


class NonFiniteLossError(UserError):
    """A loss became NaN or infinite."""


def check_finite(rows: torch.Tensor, names, first_iteration: int, epoch: int, device, run_dir: str) -> None:
    """Raise on the first non-finite value in ``rows`` (iterations x ``names``), on every rank if any has one.

    The message names the first non-finite term of the first such iteration, a total (:data:`TOTAL_LOSSES`)
    only when none of the terms is non-finite.
    """
    bad = (~torch.isfinite(rows)).nonzero().tolist()
    anywhere = distributed.all_reduce(torch.tensor([len(bad)], device=device), dist.ReduceOp.MAX)
    if not anywhere.item():
        return
    if not bad:
        raise NonFiniteLossError(f"another process stopped on a non-finite loss at epoch {epoch + 1}")
    row = bad[0][0]
    column = min((c for r, c in bad if r == row), key=lambda c: names[c] in TOTAL_LOSSES)
    raise NonFiniteLossError(
        f"loss {names[column]} became {rows[row, column].item()} at epoch {epoch + 1}, iteration "
        f"{first_iteration + row + 1}; stopped. The last good checkpoint in {run_dir} is kept; "
        f"lower lr_S / lr_G, lower that term's weight or check the teacher weights")
