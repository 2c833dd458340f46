"""1-Lipschitz building blocks of LipSim: SLL residual layers, channel padding, sum-pooling.

SLL ("SDP-based Lipschitz layers", Araujo et al., ICLR 2023, arXiv 2303.03169):

    h(x) = x − 2·W·T⁻¹·ReLU(Wᵀx + b),   T = diag(t),   t_i = Σ_j |(WᵀW)_ij|·q_j/q_i,

with q = exp(q_param) > 0. T ⪰ WᵀW (a weighted Gershgorin bound), which makes h 1-Lipschitz in ℓ2.
For a convolution the Gram WᵀW is itself a convolution; its absolute row sums are obtained from
conv2d(K, K, padding=k−1) summed in absolute value over every shift.

Every layer has an inference form (`freeze()`): T⁻¹ is computed once and folded into the kernel of
the transposed product, so a frozen forward pass does no Gram computation. `unfreeze()` goes back.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["safe_inv", "SLLConv2d", "SLLLinear", "PadChannels", "SumPool2d"]


def safe_inv(t: torch.Tensor) -> torch.Tensor:
    """Elementwise 1/t with 1/0 := 0 (a zero row of the Gram means a zero column of W).

    Written with two `where`s so that neither the value nor the gradient can be inf/NaN.
    """
    nonzero = t > 0
    return torch.where(nonzero, 1.0 / torch.where(nonzero, t, torch.ones_like(t)), torch.zeros_like(t))


def _sll_scale(gram_abs_rowwise: torch.Tensor, q_param: torch.Tensor) -> torch.Tensor:
    """t⁻¹ with t_i = Σ_j |G_ij|·q_j/q_i, q = exp(q_param); G given in absolute value, shape (n, n)."""
    # t is invariant to shifting q_param; shifting by its max keeps exp() from overflowing.
    q = torch.exp(q_param - q_param.max().detach())
    t = (gram_abs_rowwise * q[None, :]).sum(1) / q
    return safe_inv(t)


def _weights_key(*params: torch.Tensor) -> tuple:
    """Identity + in-place version of the tensors a fold was computed from (detects stale folds)."""
    return tuple((p.data_ptr(), p._version) for p in params)


class _FoldedSLL(nn.Module):
    """The inference form shared by the SLL layers: 2·T⁻¹ folded into the output weight W.

    Subclasses name their weight (`_weight`) and how t broadcasts against it (`_fold_view`). A fold
    records the identity and in-place version of (W, q); a forward that finds them changed (optimizer
    step, in-place edit) refolds first, and loading a state dict refolds: a stale fold is not 1-Lipschitz.
    """

    _fold_view: tuple[int, ...] = (-1,)

    def _weight(self) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def freeze(self) -> None:
        """Fold 2·T⁻¹ into the output weight (inference form)."""
        # Not an inference tensor even when called under inference_mode: attacks need autograd through it.
        with torch.inference_mode(False), torch.no_grad():
            self._folded = (2 * self.inv_t()).view(self._fold_view) * self._weight()
        self._fold_key = _weights_key(self._weight(), self.q)

    def unfreeze(self) -> None:
        self._folded = None

    @property
    def frozen(self) -> bool:
        return self._folded is not None

    def _fresh_fold(self) -> torch.Tensor | None:
        """The fold, refolded first when the weights changed in place since it was made (None: unfrozen)."""
        if self._folded is not None and self._fold_key != _weights_key(self._weight(), self.q):
            self.freeze()
        return self._folded

    def _load_from_state_dict(self, *args) -> None:
        was_frozen = self._folded is not None
        self._folded = None
        super()._load_from_state_dict(*args)
        if was_frozen:
            self.freeze()


class SLLConv2d(_FoldedSLL):
    """Convolutional SLL layer on (B, C, H, W) tensors, 1-Lipschitz in ℓ2 (any H, W; zero padding).

    kernel K: (inner, C, k, k); bias: (1, inner, 1, 1); q_param: (inner,).
    h(x) = x − 2·conv_transpose2d(t⁻¹ ⊙ ReLU(conv2d(x, K) + b), K).
    """

    def __init__(self, channels: int, inner: int, kernel_size: int = 3):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.channels, self.inner, self.kernel_size = channels, inner, kernel_size
        self.padding = kernel_size // 2
        self.kernel = nn.Parameter(torch.empty(inner, channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(1, inner, 1, 1))
        self.q = nn.Parameter(torch.empty(inner))
        self.reset_parameters()
        # Inference form (see freeze()); a non-persistent buffer so that .to(device) moves it.
        self.register_buffer("_folded", None, persistent=False)

    def reset_parameters(self) -> None:
        nn.init.xavier_normal_(self.kernel)
        fan_in = self.channels * self.kernel_size**2
        nn.init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        nn.init.normal_(self.q)

    def gram_abs(self) -> torch.Tensor:
        """(inner, inner) matrix Σ_shifts |(K ⋆ K)_ij(shift)| bounding the convolution's Gram."""
        ktk = F.conv2d(self.kernel, self.kernel, padding=self.kernel_size - 1)
        return ktk.abs().sum((2, 3))

    def inv_t(self) -> torch.Tensor:
        return _sll_scale(self.gram_abs(), self.q)

    _fold_view = (-1, 1, 1, 1)

    def _weight(self) -> torch.Tensor:
        return self.kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        folded = self._fresh_fold()
        res = F.relu(F.conv2d(x, self.kernel, padding=self.padding) + self.bias)
        if folded is not None:
            return x - F.conv_transpose2d(res, folded, padding=self.padding)
        res = self.inv_t()[None, :, None, None] * res
        return x - 2 * F.conv_transpose2d(res, self.kernel, padding=self.padding)


class SLLLinear(_FoldedSLL):
    """Dense SLL layer on (B, features) tensors, 1-Lipschitz in ℓ2.

    weight W: (inner, features) (so Wx is the inner pre-activation); bias (1, inner); q_param (inner,).
    h(x) = x − 2·Wᵀ(t⁻¹ ⊙ ReLU(Wx + b)), t_i = Σ_j |(WWᵀ)_ij|·q_j/q_i.
    """

    def __init__(self, features: int, inner: int):
        super().__init__()
        self.features, self.inner = features, inner
        self.weight = nn.Parameter(torch.empty(inner, features))
        self.bias = nn.Parameter(torch.empty(1, inner))
        self.q = nn.Parameter(torch.empty(inner))
        self.reset_parameters()
        # Inference form (see freeze()); a non-persistent buffer so that .to(device) moves it.
        self.register_buffer("_folded", None, persistent=False)

    def reset_parameters(self) -> None:
        nn.init.xavier_normal_(self.weight)
        nn.init.uniform_(self.bias, -1 / math.sqrt(self.features), 1 / math.sqrt(self.features))
        nn.init.normal_(self.q)

    def inv_t(self) -> torch.Tensor:
        return _sll_scale((self.weight @ self.weight.T).abs(), self.q)

    _fold_view = (-1, 1)

    def _weight(self) -> torch.Tensor:
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        folded = self._fresh_fold()
        res = F.relu(F.linear(x, self.weight) + self.bias)
        if folded is not None:
            return x - res @ folded
        return x - 2 * (self.inv_t() * res) @ self.weight


class PadChannels(nn.Module):
    """Zero-pad (B, c, H, W) to (B, channels, H, W): an isometry, hence 1-Lipschitz."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extra = self.channels - x.shape[1]
        if extra < 0:
            raise ValueError(f"cannot pad {x.shape[1]} channels down to {self.channels}")
        return F.pad(x, (0, 0, 0, 0, 0, extra))


class SumPool2d(nn.Module):
    """Non-overlapping s×s window sum divided by s: ‖pool(x)‖₂ ≤ ‖x‖₂ (Cauchy–Schwarz), equality on constants.

    Equals nn.AvgPool2d(s, divisor_override=s). The input side must be a multiple of s.
    """

    def __init__(self, size: int = 4):
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.size or x.shape[-2] % self.size:
            raise ValueError(f"input {tuple(x.shape[-2:])} is not a multiple of the pool size {self.size}")
        return F.avg_pool2d(x, self.size, divisor_override=self.size)
