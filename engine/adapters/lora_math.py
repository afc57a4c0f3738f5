"""The weight change each LoRA-family module stands for, in float32.

Formulas (kohya-ss sd-scripts, LyCORIS, A1111 extensions-builtin/Lora, PEFT), with ``scale`` = alpha / rank
(alpha missing or 0: 1):

* LoRA / LoCon: dW = scale * up @ down, down [r, in(, kh, kw)], up [out, r(, 1, 1)]; with CP (``lora_mid``
  [r, r, kh, kw], down then 1x1): dW[i,j,k,l] = scale * sum mid[n,m,k,l] up[i,n] down[m,j].
* LoHa: dW = scale * (w1a @ w1b) * (w2a @ w2b) (Hadamard product); with Tucker (``hada_t1/t2`` [r, r, kh, kw],
  w_a [r, out], w_b [r, in]) each factor is t x_0 w_a x_1 w_b. Rank = w1b.shape[0].
* LoKr: dW = scale * kron(w1, w2), each either full or a product (w_a @ w_b); w2 may be Tucker. The rank is the
  factored part's (w1b's, else w2b's); both factors full means scale 1 whatever alpha says (LyCORIS ignores it).
* LyCORIS "full": dW = diff, db = diff_b.

Shapes are checked from the file's shape table before a tensor is read (:func:`delta_shape`), and deltas are
produced in blocks of output rows (:class:`WeightDelta`), so merging into an SD 1.5 feed-forward weight never
holds more than a few MB of float32 at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

Shape = tuple[int, ...]

# Roles of the tensors each kind needs (one of the alternatives in a tuple) and may have.
REQUIRED: dict[str, tuple[tuple[str, ...], ...]] = {
    "lora": (("down",), ("up",)),
    "loha": (("w1a",), ("w1b",), ("w2a",), ("w2b",)),
    "lokr": (("w1", "w1a"), ("w2", "w2a")),
    "full": (("diff",),),
}
OPTIONAL: dict[str, tuple[str, ...]] = {
    "lora": ("mid", "up_bias"),
    "loha": ("t1", "t2"),
    "lokr": ("w1b", "w2b", "t2"),
    "full": ("diff_b",),
}


class DeltaShapeError(ValueError):
    """The module's own tensors disagree with each other; ``role`` names the tensor to blame."""

    def __init__(self, role: str, message: str):
        self.role = role
        super().__init__(message)


def _flat(shape: Shape) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])


def rank(kind: str, shapes: Mapping[str, Shape]) -> int | None:
    """The rank alpha is divided by; None where the module has none (full matrices, full diff)."""
    if kind == "lora":
        return shapes["down"][0]
    if kind == "loha":
        return shapes["w1b"][0]
    if kind == "lokr":
        for b in ("w1b", "w2b"):
            if b in shapes:
                return shapes[b][0]
    return None


def scale(kind: str, shapes: Mapping[str, Shape], alpha: float | None, rs_lora: bool = False) -> float:
    r = rank(kind, shapes)
    if r is None or not alpha:
        return 1.0
    return alpha / (math.sqrt(r) if rs_lora else r)


def _need(cond: bool, role: str, message: str) -> None:
    if not cond:
        raise DeltaShapeError(role, message)


def _tucker_shape(t: Shape, a: Shape, b: Shape, role: str) -> Shape:
    _need(len(t) >= 2 and len(a) == 2 and len(b) == 2 and t[0] == a[0] and t[1] == b[0], role,
          f"Tucker core {t} does not fit its factors {a} and {b}")
    return (a[1], b[1], *t[2:])


def _product_shape(a: Shape, b: Shape, role: str) -> Shape:
    """Shape of a @ b with b's trailing dims kept as kernel dims (LyCORIS stores conv factors flattened or not)."""
    _need(len(a) >= 2 and len(b) >= 2 and _flat(a)[1] == b[0], role, f"factors {a} and {b} do not multiply")
    return (a[0], *b[1:])


def delta_shape(kind: str, shapes: Mapping[str, Shape]) -> tuple[Shape, Shape | None]:
    """(weight delta shape, bias delta shape or None) from tensor shapes alone. The weight delta's shape may be
    a flattened form of the target's (e.g. [out, in*kh*kw]); :func:`fits` says whether it fits."""
    s = shapes
    bias: Shape | None = None
    if kind == "lora":
        down, up = s["down"], s["up"]
        _need(len(up) >= 2 and _flat(up)[1] == down[0], "up", f"lora_up {up} does not match lora_down {down} (rank {down[0]})")
        if "mid" in s:
            mid = s["mid"]
            _need(len(mid) == 4 and mid[0] == up[1] and mid[1] == down[0] and _flat(down)[1] == down[1], "mid",
                  f"lora_mid {mid} does not fit lora_up {up} and lora_down {down}")
            weight: Shape = (up[0], down[1], *mid[2:])
        else:
            weight = (up[0], *down[1:])
        if "up_bias" in s:
            bias = s["up_bias"]
    elif kind == "loha":
        if "t1" in s:
            w1 = _tucker_shape(s["t1"], s["w1a"], s["w1b"], "t1")
        else:
            w1 = _product_shape(s["w1a"], s["w1b"], "w1b")
        if "t2" in s:
            w2 = _tucker_shape(s["t2"], s["w2a"], s["w2b"], "t2")
        else:
            w2 = _product_shape(s["w2a"], s["w2b"], "w2b")
        _need(_flat(w1) == _flat(w2), "w2a", f"the two Hadamard factors differ in shape: {w1} and {w2}")
        weight = w1
    elif kind == "lokr":
        w1 = s["w1"] if "w1" in s else _product_shape(s["w1a"], s["w1b"], "w1b")
        if "w2" in s:
            w2 = s["w2"]
        elif "t2" in s:
            w2 = _tucker_shape(s["t2"], s["w2a"], s["w2b"], "t2")
        else:
            w2 = _product_shape(s["w2a"], s["w2b"], "w2b")
        _need(len(w1) == 2, "w1", f"lokr_w1 must be a matrix, got {w1}")
        weight = (w1[0] * w2[0], w1[1] * math.prod(w2[1:]))
    elif kind == "full":
        weight = s["diff"]
        bias = s.get("diff_b")
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return weight, bias


def fits(delta: Shape, target: Shape) -> bool:
    """A delta fits a weight with as many outputs and elements (a 1x1 conv takes a linear's [out, in] delta, a
    3x3 conv the flattened [out, in*9] one: both flatten in the same order)."""
    return bool(delta) and bool(target) and delta[0] == target[0] and math.prod(delta) == math.prod(target)


class WeightDelta:
    """scale * dW of one module, computed on demand in blocks of output rows, float32, in the target's shape."""

    def __init__(self, kind: str, tensors: Mapping[str, torch.Tensor], scale: float, target: Shape):
        self.kind = kind
        self.target = tuple(target)
        self.rows = self.target[0]
        t = {k: v.float() for k, v in tensors.items()}
        self._scale = scale
        if kind == "lora":
            r = t["down"].shape[0]
            self._up = t["up"].reshape(self.rows, -1) * scale
            down = t["down"].reshape(r, -1)
            if "mid" in t:
                # mid x down first: [r_up, in, kh, kw], as small as the LoRA itself.
                self._right = torch.einsum("nmkl,mj->njkl", t["mid"], down).reshape(t["mid"].shape[0], -1)
            else:
                self._right = down
        elif kind == "loha":
            self._f = [self._hada_factor(t, i) for i in (1, 2)]
        elif kind == "lokr":
            w1 = t["w1"] if "w1" in t else t["w1a"] @ t["w1b"]
            if "w2" in t:
                w2 = t["w2"]
            elif "t2" in t:
                w2 = torch.einsum("ijkl,jr,ip->prkl", t["t2"], t["w2b"], t["w2a"])
            else:
                w2 = t["w2a"] @ t["w2b"]
            self._w1 = (w1 * scale).contiguous()
            self._w2 = w2.reshape(w2.shape[0], -1).contiguous()  # torch.kron views its inputs
        elif kind == "full":
            self._diff = t["diff"].reshape(self.rows, -1)

    @staticmethod
    def _hada_factor(t: Mapping[str, torch.Tensor], i: int):
        a, b = t[f"w{i}a"], t[f"w{i}b"]
        if f"t{i}" in t:
            # core x_1 w_b first ([r, in, kh, kw]); the rows come from w_a's columns.
            core = torch.einsum("ijkl,jr->irkl", t[f"t{i}"], b)
            return lambda s, e: torch.einsum("irkl,ip->prkl", core, a[:, s:e]).reshape(e - s, -1)
        b = b.reshape(b.shape[0], -1)
        return lambda s, e: a[s:e] @ b

    def block(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of scale * dW, shaped like the same rows of the target weight."""
        if self.kind == "lora":
            out = self._up[start:stop] @ self._right
        elif self.kind == "loha":
            out = self._f[0](start, stop) * self._f[1](start, stop) * self._scale
        elif self.kind == "lokr":
            b = self._w2.shape[0]
            first, last = start // b, (stop - 1) // b + 1
            out = torch.kron(self._w1[first:last], self._w2)[start - first * b: stop - first * b]
        else:
            out = self._diff[start:stop]
        return out.reshape(stop - start, *self.target[1:])


BIAS_ROLES = {"lora": "up_bias", "full": "diff_b"}


def bias_delta(kind: str, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """The bias change (PEFT ``lora_B.bias``, scaled like the weight's; LyCORIS ``diff_b``, as is), float32."""
    return bias.float() * (scale if kind == "lora" else 1.0)
