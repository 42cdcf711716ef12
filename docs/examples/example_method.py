"""Adding a method to ``dmft.solve``: gradient flow under the frozen (static) NTK.

``method="static"`` steps gradient descent in discrete time, f(t+1) = f(t) + lr K Delta(t).
Its gradient-flow limit (lr -> 0 at fixed t = k lr) has a closed form. With the static NTK K,
f(0) = 0, targets y on the P training points and the matrix
Psi(t) = int_0^t expm(-K_PP s) ds (P, P), every point, train and test, follows

    f(t) = K[:, :P] Psi(t) y,   so on the training points  f_P(t) = (I - expm(-K_PP t)) y.

Psi(t) is the top-right block of expm([[-K_PP, I], [0, 0]] t) (Van Loan), so no inverse of
K_PP is needed. A method is one class: its options (a frozen dataclass) and ``run``; the
skeleton (``dmft.Method``) does seeds, timing, progress, logging, ``throw=`` and the status.
"""
from dataclasses import dataclass, replace

import numpy as np
from scipy.linalg import expm

import dmft


def _fraction(name, value):
    """An option's check: return the (normalised) value or raise ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}; e.g. {name}=1e-3")
    return float(value)


@dataclass(frozen=True)
class GradientFlowOptions(dmft.Options):
    # Each field is one keyword option: default, check, one-line doc. Unknown keywords are
    # refused with a message listing these fields.
    quad_tol: float = dmft.option(1e-12, _fraction, "quadrature error of the static kernels")
    fit_tol: float | None = dmft.option(None, _fraction, "final loss below fit_tol * initial")


class GradientFlow(dmft.Method):
    name = "gradient-flow"
    description = "frozen NTK, continuous-time gradient flow (matrix exponential)"
    Options = GradientFlowOptions

    def run(self, ctx, net, data, train, *, opts):
        # ctx: the seed (ctx.seed_int, ctx.rng()), ctx.bar(...) for progress; unused here
        # the static NTK (throw=False: lr is a time step here, not a stability limit)
        static = dmft.solve(net, data, train, method="static", quad_tol=opts.quad_tol,
                            throw=False)
        K, P = static.ntk[0], data.P
        M = np.zeros((2 * P, 2 * P))
        M[:P, :P], M[:P, P:] = -K[:P, :P], np.eye(P)
        f = np.stack([K[:, :P] @ expm(M * t)[:P, P:] @ data.y_train for t in train.times])
        sol = replace(static, method=self.name, train_predictions=f[:, :P],
                      test_predictions=f[:, P:], seed=ctx.seed_int, converged=True,
                      status=None, message=None,  # None: derived from converged
                      options=dict(static.options, fit_tol=opts.fit_tol))
        loss = sol.train_loss
        if opts.fit_tol is not None and not loss[-1] < opts.fit_tol * loss[0]:
            # a failure with a result: the skeleton raises (throw=True) or returns it
            sol.fail("not_converged", f"method='gradient-flow': the training loss fell to "
                     f"{loss[-1] / loss[0]:.3g} of its initial value, not below fit_tol = "
                     f"{opts.fit_tol:g}; train longer (more steps or a larger lr)")
        return sol


# The one table entry: from here on dmft.solve(..., method="gradient-flow") works.
dmft.METHODS["gradient-flow"] = GradientFlow()
