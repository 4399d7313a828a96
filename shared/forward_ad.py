"""Exact mixed second derivatives grad_alpha (grad_w L . u) in reverse-over-forward mode.

By symmetry of second derivatives grad_alpha (grad_w L(w, alpha) . u) = grad_alpha (d/dt L(w + t u, alpha) at t=0):
one forward pass carrying the tangent u of the weights (forward-mode AD) gives the directional derivative of the
loss as a differentiable function of alpha, and one backward pass of it gives the product. Double backward instead
records the whole first backward pass as a graph and differentiates it again.

torch's forward-mode formulas are not all fit for this. Those of batch_norm and layer_norm read the saved mean and
inverse deviation as constants, so the reverse pass through their tangents is silently wrong; those of softmax and
log_softmax (hence cross_entropy) modify a saved tensor in place, so the reverse pass fails; an elementwise operator
with one operand that carries no tangent (a dropout mask, the alphas' weights, a Python number) builds a zero tangent
whose shape torch computes in Python, ~0.6 ms a call. `TangentRules` gives those functions their own rules: each
computes the primal with torch's operator and the tangent with differentiable operators, and joins them with
`make_dual`. Every rule and both supernets are checked against double backward (tests/shared/test_forward_ad.py).
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode


def _split(value: Any) -> tuple[Any, Tensor | None]:
    """(primal, tangent) of a dual tensor; (value, None) for anything else."""
    if isinstance(value, Tensor):
        primal, tangent = fwAD.unpack_dual(value)
        return (value, None) if tangent is None else (primal, tangent)
    return value, None


def _dual(primal: Tensor, tangent: Tensor) -> Tensor:
    if tangent.shape != primal.shape:  # a broadcast operand's tangent
        tangent = tangent.expand(primal.shape).contiguous()
    return fwAD.make_dual(primal, tangent)


# ---- elementwise arithmetic with one operand that carries no tangent -----------------------------------------------
def _arithmetic(op: str) -> Callable[..., Tensor | None]:
    function = getattr(operator, "truediv" if op == "div" else op)

    def rule(a: Any, b: Any, **options: Any) -> Tensor | None:
        (pa, ta), (pb, tb) = _split(a), _split(b)
        if options or (ta is None) == (tb is None):
            return None  # both carry tangents (torch's formula is fast), neither (no forward mode), or options
        result = function(pa, pb)
        if op == "add":
            tangent = ta if tb is None else tb
        elif op == "sub":
            tangent = ta if tb is None else -tb
        elif op == "mul":
            tangent = ta * pb if tb is None else tb * pa
        else:  # d(a / b) = da / b - (a / b) db / b
            tangent = ta / pb if tb is None else -(result / pb) * tb
        return _dual(result, tangent)

    return rule


def _reflected(rule: Callable[..., Tensor | None]) -> Callable[..., Tensor | None]:
    return lambda a, b: rule(b, a)


def _lerp(input: Any, end: Any, weight: Any) -> Tensor | None:
    (ps, ts), (pe, te), (pw, tw) = _split(input), _split(end), _split(weight)
    if ts is None and te is None and tw is None:
        return None
    result = torch.lerp(ps, pe, pw)
    tangent = 0
    if ts is not None or te is not None:
        start_t = ts if ts is not None else torch.zeros_like(result)
        end_t = te if te is not None else torch.zeros_like(result)
        tangent = torch.lerp(start_t.expand(result.shape), end_t.expand(result.shape), pw)
    if tw is not None:
        tangent = tangent + tw * (pe - ps)
    return _dual(result, tangent)


# ---- normalisations and softmax: the statistics differentiated, no in-place formulas --------------------------------
def _normalise(primal: Tensor, tangent: Tensor, dims: list[int], eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    var, mean = torch.var_mean(primal, dims, correction=0, keepdim=True)
    scale = (var + eps).rsqrt()
    out = (primal - mean) * scale
    out_t = scale * (tangent - tangent.mean(dims, keepdim=True) - out * (out * tangent).mean(dims, keepdim=True))
    return out, out_t, mean, var


def _batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None = None,
                bias: Tensor | None = None, training: bool = False, momentum: float = 0.1,
                eps: float = 1e-5) -> Tensor | None:
    primal, tangent = _split(input)
    if tangent is None:
        return None  # the input carries no tangent: torch's formula only sees the affine parameters' (linear)
    shape = [1, -1] + [1] * (input.dim() - 2)
    if training:
        out, out_t, mean, var = _normalise(primal, tangent, [0, *range(2, input.dim())], eps)
        if running_mean is not None:
            with torch.no_grad():  # as torch updates them: momentum, the unbiased variance
                n = input.numel() // input.size(1)
                running_mean.lerp_(mean.view(-1).to(running_mean.dtype), momentum)
                running_var.lerp_((var.view(-1) * n / max(n - 1, 1)).to(running_var.dtype), momentum)
    else:
        scale = (running_var.view(shape) + eps).rsqrt()
        out, out_t = (primal - running_mean.view(shape)) * scale, tangent * scale
    return _affine(_dual(out, out_t), weight, bias, shape)


def _layer_norm(input: Tensor, normalized_shape: list[int], weight: Tensor | None = None, bias: Tensor | None = None,
                eps: float = 1e-5) -> Tensor | None:
    primal, tangent = _split(input)
    if tangent is None:
        return None
    out, out_t, _, _ = _normalise(primal, tangent, list(range(input.dim() - len(normalized_shape), input.dim())), eps)
    return _affine(_dual(out, out_t), weight, bias, list(normalized_shape))


def _affine(out: Tensor, weight: Tensor | None, bias: Tensor | None, shape: list[int]) -> Tensor:
    """out * weight + bias through this module's mode (the rules above see their tangents)."""
    with TangentRules():
        if weight is not None:
            out = out * weight.view(shape)
        return out if bias is None else out + bias.view(shape)


def _softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3,
             dtype: torch.dtype | None = None) -> Tensor | None:
    primal, tangent = _split(input)
    if tangent is None or dim is None:
        return None
    out = torch.softmax(primal, dim, dtype=dtype)
    tangent = tangent.to(out.dtype)
    return _dual(out, out * (tangent - (out * tangent).sum(dim, keepdim=True)))


def _log_softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3,
                 dtype: torch.dtype | None = None) -> Tensor | None:
    primal, tangent = _split(input)
    if tangent is None or dim is None:
        return None
    out = torch.log_softmax(primal, dim, dtype=dtype)
    tangent = tangent.to(out.dtype)
    return _dual(out, tangent - (out.exp() * tangent).sum(dim, keepdim=True))


def _cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None = None, size_average: Any = None,
                   ignore_index: int = -100, reduce: Any = None, reduction: str = "mean",
                   label_smoothing: float = 0.0) -> Tensor | None:
    log_probs = _log_softmax(input, 1)
    if log_probs is None or target.is_floating_point() or label_smoothing or size_average is not None \
            or reduce is not None:
        return None  # not covered: torch's own formula, which fails loudly in the reverse pass
    return F.nll_loss(log_probs, target, weight, ignore_index=ignore_index, reduction=reduction)


def _instance_norm(*args: Any, **kwargs: Any) -> Tensor:
    raise NotImplementedError("instance_norm has no twice-differentiable forward-mode formula here; "
                              "use order=second for a model with InstanceNorm")


_RULES: dict[Callable[..., Any], Callable[..., Any]] = {
    F.batch_norm: _batch_norm, F.layer_norm: _layer_norm, F.instance_norm: _instance_norm,
    F.cross_entropy: _cross_entropy, torch.lerp: _lerp, Tensor.lerp: _lerp,
    **{f: _softmax for f in (F.softmax, torch.softmax, Tensor.softmax)},
    **{f: _log_softmax for f in (F.log_softmax, torch.log_softmax, Tensor.log_softmax)},
}
for _op in ("mul", "add", "sub", "div"):
    _rule = _arithmetic(_op)
    _RULES.update({getattr(torch, _op): _rule, getattr(Tensor, _op): _rule, getattr(Tensor, f"__{_op}__"): _rule})
    _reflected_name = "__rtruediv__" if _op == "div" else f"__r{_op}__"
    _RULES[getattr(Tensor, _reflected_name)] = _reflected(_rule)
_RULES[Tensor.__truediv__] = _RULES[Tensor.div]


class TangentRules(TorchFunctionMode):
    """Gives the functions of `_RULES` this module's forward-mode rules; every other function runs as torch's."""

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        rule = _RULES.get(func)
        if rule is not None:
            result = rule(*args, **kwargs)
            if result is not None:
                return result
        return func(*args, **kwargs)


def directional_derivative(loss: Callable[[dict[str, Tensor]], Tensor], weights: dict[str, Tensor],
                           tangents: list[Tensor]) -> Tensor:
    """d/dt loss(weights + t * tangents) at t = 0, differentiable in everything else the loss reads (the alphas)."""
    with fwAD.dual_level(), TangentRules():
        dual = {n: fwAD.make_dual(w.detach(), t) for (n, w), t in zip(weights.items(), tangents)}
        tangent = fwAD.unpack_dual(loss(dual)).tangent
    if tangent is None:
        raise ValueError("the loss does not depend on the weights")
    return tangent
