"""The DARTS bilevel engine: the architecture step (and the matching weight step) for any model.

A model exposes two kinds of parameters through two optimizers: weights w (the weight optimizer's parameters) and
architecture parameters alpha (the architecture optimizer's). A task hands the engine loss functions that take a
`forward` callable -- the model evaluated at some weights -- and return a scalar loss, so the engine can evaluate
L_train and L_val at shifted weights through `torch.func.functional_call` without copying the model:

    plain:  no architecture step (weight steps only: the baseline every order is compared with)
    first:  grad_alpha L_val(w, alpha)
    second: grad_alpha L_val(w', alpha) - [grad_alpha L_train(w + eps u) - grad_alpha L_train(w - eps u)] / (2 eps)
            w' = one virtual step of the real weight optimizer from g = grad_w L_train(w, alpha), clipped like the
            real step; v = grad_w' L_val(w', alpha); u = -(dw'/dg)^T v; eps = r / ||u||  (eq. 6-7)
    exact:  the same with the Hessian-vector product grad_alpha (grad_w L_train(w) . u) by double backward.

u is the vector-Jacobian product of the weight optimizer's step (shared.virtual_step) with the clip factor held
constant, so it honours clipping, momentum, weight decay, Adam's moments and per-group learning rates alike. For
plain SGD with learning rate xi and no clipping u = xi * v, and the points w +- eps u are exactly the paper's
w +- (r / ||v||) v. The learning rates are read from the optimizer at call time (schedulers and per-step rescaling
apply).

An architecture step leaves the model's weights, buffers (BatchNorm statistics run on copies) and the weight
optimizer's state untouched, and the +-eps passes replay the random draws (dropout masks) of the training pass that
defined w', so finite difference and double backward differentiate the same function.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from shared.collapse import Eigen, top_eigenvalue
from shared.compiled import check_compile, compile_model, eager
from shared.errors import ConfigError
from shared.virtual_step import check_differentiable, unrolled_step
from shared.validation import check_choice, check_fields

Forward = Callable[..., Any]
LossFn = Callable[[Forward], Tensor]
Reduce = Callable[[Sequence[Tensor]], None]  # in-place average across processes (DDP); a no-op on one process
ORDERS = ("plain", "first", "second", "exact")  # plain: weight steps only, the architecture step does nothing
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class BilevelConfig:
    order: str = "second"  # plain (no architecture step) | first | second (finite-difference Hessian) | exact
    grad_clip: float | None = None  # max norm of the weight gradient, for the real and the virtual step alike
    fd_radius: float = 0.01  # r in eps = r / ||u|| (paper eq. 7: r / ||v|| for plain SGD)
    # bf16: the forward passes of the weight step and of the validation gradient (at w, or at w') run under bf16
    # autocast; the training gradient behind w', the +-eps passes (a difference of nearly equal gradients), the exact
    # product and the Hessian measurement stay in fp32, as do the parameters, the optimizers and the alphas' update.
    precision: str = "fp32"
    # torch.compile the model in this mode (shared.compiled: off | default | reduce-overhead | ...); every pass runs
    # compiled but the double-backward ones (order=exact is refused; the collapse measurement runs eager)
    compile: str = "off"

    def __post_init__(self) -> None:
        check_fields(self)
        check_choice("order", self.order, ORDERS)
        check_choice("precision", self.precision, PRECISIONS)
        check_compile(self.order, self.compile)
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"grad_clip must be positive or None, got {self.grad_clip}")
        if self.fd_radius <= 0:
            raise ConfigError(f"fd_radius must be positive, got {self.fd_radius}")


@dataclass
class ArchGradient:
    grads: list[Tensor]  # one per architecture parameter, in the architecture optimizer's order
    valid_loss: Tensor  # the validation loss the gradient came from (detached), for logging


def _no_reduce(tensors: Sequence[Tensor]) -> None:
    pass


def _grad(output: Tensor, inputs: list[Tensor], create_graph: bool = False) -> list[Tensor]:
    """Gradients of `output`, zeros for inputs it does not use (a cell may leave an op or a weight out)."""
    return list(torch.autograd.grad(output, inputs, create_graph=create_graph, allow_unused=True,
                                    materialize_grads=True))


class _RandomReplay:
    """Snapshot of the RNG streams a forward pass may draw from, to replay the same dropout masks."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device if device.type == "cuda" else None
        self.states = self._get()

    def _get(self) -> tuple[Tensor, Tensor | None]:
        return torch.get_rng_state(), torch.cuda.get_rng_state(self.cuda) if self.cuda is not None else None

    def _set(self, states: tuple[Tensor, Tensor | None]) -> None:
        torch.set_rng_state(states[0])
        if self.cuda is not None:
            torch.cuda.set_rng_state(states[1], self.cuda)

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block with the snapshot's draws, then put the streams back where they were."""
        resume = self._get()
        self._set(self.states)
        try:
            yield
        finally:
            self._set(resume)


class Bilevel:
    """Architecture and weight steps of DARTS for `model`, whose parameters the two optimizers split between them."""

    def __init__(self, model: nn.Module, weight_optimizer: torch.optim.Optimizer,
                 arch_optimizer: torch.optim.Optimizer, config: BilevelConfig, reduce: Reduce = _no_reduce) -> None:
        self.model, self.config, self.reduce = model, config, reduce
        self.weight_optimizer, self.arch_optimizer = weight_optimizer, arch_optimizer
        names = {id(p): n for n, p in model.named_parameters()}
        self.weights = [(names[id(p)], p) for g in weight_optimizer.param_groups for p in g["params"]]
        self.alphas = [(names[id(p)], p) for g in arch_optimizer.param_groups for p in g["params"]]
        if {n for n, _ in self.weights} & {n for n, _ in self.alphas}:
            raise ConfigError("a parameter is in both the weight and the architecture optimizer")
        if config.order in ("second", "exact"):
            check_differentiable(weight_optimizer)
        if config.compile != "off":
            compile_model(model, config.compile)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The two optimizers by the names a checkpoint keeps them under."""
        return {"weight_optimizer": self.weight_optimizer, "arch_optimizer": self.arch_optimizer}

    # ---- the two steps -------------------------------------------------------------------------------------------
    def weight_step(self, train_loss: LossFn) -> Tensor:
        """One real weight step: backward into the weights only, reduce, clip, optimizer step. Returns the loss."""
        self.weight_optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = train_loss(self.model)
        params = [p for _, p in self.weights]
        torch.autograd.backward(loss, inputs=params)  # no alpha gradients: they are the architecture step's business
        self.reduce([p.grad for p in params])
        if self.config.grad_clip is not None:
            nn.utils.clip_grad_norm_(params, self.config.grad_clip, foreach=True)
        self.weight_optimizer.step()
        return loss.detach()

    def arch_step(self, train_loss: LossFn, valid_loss: LossFn) -> Tensor | None:
        """One architecture step with the configured order. Returns the validation loss (detached); None for
        plain, which evaluates nothing and changes nothing."""
        if self.config.order == "plain":
            return None
        result = self.hypergradient(train_loss, valid_loss)
        self.arch_optimizer.zero_grad(set_to_none=True)
        for (_, alpha), grad in zip(self.alphas, result.grads):
            alpha.grad = grad
        self.arch_optimizer.step()
        return result.valid_loss

    def hypergradient(self, train_loss: LossFn, valid_loss: LossFn) -> ArchGradient:
        """The architecture gradient of the configured order, reduced across processes; changes nothing."""
        if self.config.order == "plain":
            raise ValueError("order plain takes no architecture gradient")
        if self.config.order == "first":
            result = self._first_order(valid_loss)
        else:
            result = self._unrolled(train_loss, valid_loss, exact=self.config.order == "exact")
        self.reduce(result.grads)
        return result

    # ---- gradients -----------------------------------------------------------------------------------------------
    def _first_order(self, valid_loss: LossFn) -> ArchGradient:
        weights = {n: p.detach() for n, p in self.weights}  # detached: no weight gradients are built or kept
        with self.autocast():
            loss = valid_loss(self.forward_with(weights, dict(self.alphas)))
        grads = _grad(loss, [a for _, a in self.alphas])
        return ArchGradient(list(grads), loss.detach())

    def _unrolled(self, train_loss: LossFn, valid_loss: LossFn, exact: bool) -> ArchGradient:
        alphas = [a for _, a in self.alphas]
        random = _RandomReplay(alphas[0].device)  # before the training pass: the +-eps passes replay its draws
        # 1. training gradient at w, for the virtual step (kept differentiable in alpha for the exact product)
        w = {n: p.detach().requires_grad_() for n, p in self.weights}
        alpha_in = dict(self.alphas) if exact else {n: a.detach() for n, a in self.alphas}
        loss = train_loss(self.forward_with(w, alpha_in))  # fp32 always: w' and the correction hang on it
        g_train = _grad(loss, list(w.values()), create_graph=exact)
        # 2. w' and the validation gradients there
        step = [g.detach() for g in g_train]
        self.reduce(step)
        w_prime, pullback = unrolled_step(self.weight_optimizer, step, self.config.grad_clip)
        w_prime = {n: t.requires_grad_() for n, t in zip(w, w_prime)}
        with self.autocast():
            loss_val = valid_loss(self.forward_with(w_prime, dict(self.alphas)))
        grads = _grad(loss_val, alphas + list(w_prime.values()))
        g_alpha, v = list(grads[:len(alphas)]), list(grads[len(alphas):])
        self.reduce(v)
        # 3. the Hessian-vector product along u = -(dw'/dg)^T v
        u = pullback(v)
        if exact:
            hvp = _grad(sum((g * ui).sum() for g, ui in zip(g_train, u)), alphas)
        else:
            del g_train, step, w, w_prime, grads, v, pullback  # free weight-sized copies before the two passes
            hvp = self._finite_difference(train_loss, u, random)
        return ArchGradient([g - h for g, h in zip(g_alpha, hvp)], loss_val.detach())

    def _finite_difference(self, train_loss: LossFn, u: list[Tensor], random: _RandomReplay) -> list[Tensor]:
        """(grad_alpha L_train(w + eps u) - grad_alpha L_train(w - eps u)) / (2 eps), eps = r / ||u||."""
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(ui) for ui in u]))
        eps = self.config.fd_radius / norm.clamp_min(1e-12)
        alphas = [a for _, a in self.alphas]
        sides = []
        for sign in (1.0, -1.0):
            shifted = {n: p.detach() + (sign * eps) * ui for (n, p), ui in zip(self.weights, u)}
            with random.replay():  # the same dropout masks as the training pass at w
                loss = train_loss(self.forward_with(shifted, dict(self.alphas)))
            sides.append(_grad(loss, alphas))
        return [(plus - minus) / (2 * eps) for plus, minus in zip(*sides)]

    # ---- curvature -----------------------------------------------------------------------------------------------
    def alpha_hessian_eigen(self, loss_fn: LossFn, iterations: int, tol: float) -> Eigen:
        """The largest eigenvalue of the Hessian of `loss_fn` in the alphas at the current weights (RobustDARTS'
        collapse signal), by Lanczos on double-backward Hessian-vector products of one forward pass; the start
        vector is fixed, so the same model and batch give the same estimate. Changes nothing: the weights, buffers,
        optimizers and random streams (dropout masks are drawn and the streams put back) stay as they were."""
        names = [n for n, _ in self.alphas]
        alphas = [a.detach().requires_grad_() for _, a in self.alphas]
        weights = {n: p.detach() for n, p in self.weights}
        # eager even where the model is compiled: compiled graphs have no double backward
        with _RandomReplay(alphas[0].device).replay(), eager(self.config.compile != "off"):
            loss = loss_fn(self.forward_with(weights, dict(zip(names, alphas))))
        grads = _grad(loss, alphas, create_graph=True)
        sizes = [a.numel() for a in alphas]

        def product(vector: Tensor) -> Tensor:
            pieces = vector.to(alphas[0]).split(sizes)
            dot = sum((g * p.view_as(g)).sum() for g, p in zip(grads, pieces))
            hvp = torch.autograd.grad(dot, alphas, retain_graph=True, allow_unused=True, materialize_grads=True)
            product = torch.cat([h.reshape(-1) for h in hvp])
            self.reduce([product])  # every process iterates on the same vectors
            return product

        return top_eigenvalue(product, sum(sizes), iterations, tol, torch.Generator().manual_seed(0))

    def autocast(self) -> torch.autocast:
        """bf16 autocast on the model's device when the config asks for it, else nothing."""
        device = next(iter(self.model.parameters())).device
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bf16")

    def forward_with(self, weights: dict[str, Tensor], alphas: dict[str, Tensor]) -> Forward:
        """The model as a function of the given weight and alpha tensors (by parameter name), as every pass of the
        engine runs it; buffers are copies, so BatchNorm statistics stay put."""
        tensors = {**{n: b.clone() for n, b in self.model.named_buffers()}, **weights, **alphas}
        return lambda *args, **kwargs: functional_call(self.model, tensors, args, kwargs)
