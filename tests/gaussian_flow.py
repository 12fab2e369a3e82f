"""An analytic flow-matching velocity field for tests: data x0 ~ N(m, s^2) per coordinate.

With x_t = (1 - t) x0 + t eps, x_t ~ N((1 - t) m, (1 - t)^2 s^2 + t^2) and the exact velocity is
v(x, t) = E[eps - x0 | x_t]:
    E[x0 | x_t]  = m + (1 - t) s^2 (x_t - (1 - t) m) / var_t
    E[eps | x_t] = t (x_t - (1 - t) m) / var_t
It is elementwise, so any batching of samples gives identical numbers.
"""

from __future__ import annotations

import torch


class GaussianFlow:
    def __init__(self, mean: float = 1.5, std: float = 0.5):
        self.mean, self.std = mean, std

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        t = sigma.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        var_t = (1 - t) ** 2 * self.std**2 + t**2
        centred = x - (1 - t) * self.mean
        x0 = self.mean + (1 - t) * self.std**2 * centred / var_t
        eps = t * centred / var_t
        return eps - x0
