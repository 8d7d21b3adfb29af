"""The cosine decay that every training's learning rate follows (after its warm-up, if any)."""
import math


def cosine(step: float, total: float = 1) -> float:
    """The factor at `step` of `total`: 1 at 0, 0 at total, half a cosine period between."""
    return 0.5 * (1 + math.cos(math.pi * step / total))
