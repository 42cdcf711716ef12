"""The fluctuation methods built on two-layer single-site samples: ``"propagator"`` (two-layer
networks, gamma0 > 0: samples marched under the solution's error signal, the response J by
forward-mode tangents) and ``"lazy"`` (the gamma0 -> 0 limit: frozen random kernel, linear
dynamics, exact moments for linear networks of any depth or sampled two-layer moments).
Theory: docs/theory.rst §5 and §7; the options: :mod:`dmft._fluct_options`."""
from __future__ import annotations

import numpy as np

from solvers import fluct as _engine
from solvers.fluct import deep_linear as _deep
from solvers.fluct import propagator as _prop

from ._fluct_base import (FluctuationMethod, _TwoLayer, _delta, _delta_jacobian, _need_gamma0,
                          _objective, _output_shape)
from ._fluct_options import (DEFAULT_RESPONSE_FRACTION, LazyOptions, PropagatorOptions,
                             _mask_times)


class _Propagator(_TwoLayer, name="propagator", options=PropagatorOptions,
                  description="two-layer networks, sampled single-site propagator (any smooth "
                              "activation)"):
    #: docs/theory.rst §7: the loss enters through its Jacobian d Delta / d f; the hinge
    #: loss's Jacobian is zero almost everywhere but its kink (y f = 1) moves with the
    #: fluctuations, a delta term the linearisation misses (like ReLU's phi'')
    supports = frozenset({"outputs", "losses", "weight_decay", "decay_to_zero", "batches"})

    def compute(self, state):
        sol, opts = state.sol, state.opts
        net, train = sol.net, sol.train
        _need_gamma0(self.name, train.gamma0)
        if net.activation == "relu":
            raise NotImplementedError(
                "method='propagator' does not support relu: the per-sample tangents miss "
                "the phi'' = delta(h) contribution; use a smooth activation (tanh, erf) or "
                "method='lazy' for the gamma0 -> 0 limit")
        kx = sol.data.kx
        delta, jac, obj = _delta_jacobian(sol, opts.center)
        plain = obj.plain
        T = train.steps
        # selected times, a response subsample or QMC: the adjoint engine (original problem)
        fast = plain and (state.times is not None or opts.response_samples is not None
                          or opts.sampler == "sobol")
        sampler = opts.sampler or ("sobol" if fast else "random")
        if not plain and (opts.response_samples is not None or sampler != "random"):
            raise ValueError("response_samples and sampler apply to the original problem (mse, "
                             "one output, full batch, no weight decay) only; drop them")
        if fast:
            times = list(range(T + 1)) if state.times is None else state.times
            R = -(-state.samples // DEFAULT_RESPONSE_FRACTION) \
                if opts.response_samples is None else opts.response_samples
            if sampler == "sobol":
                u, w0 = _prop.draw_units_sobol(kx, state.samples, opts.blocks, state.rng)
            else:
                u, w0 = _engine.draw_units(kx, state.samples, state.rng)
        elif plain:
            # the original problem: the original (Numba) path, numbers unchanged
            u, w0 = _engine.draw_units(kx, state.samples, state.rng)
        else:
            u, w0 = _engine.draw_units_multi(kx, state.samples, obj.C, state.rng)
        bar = state.ctx.bar(state.samples, "fluctuations", unit="sample")
        try:
            if fast:
                res = _prop.two_layer_propagator_times(
                    net.activation, u, w0, kx, _delta(sol, opts.center), train.gamma0,
                    train.lr, times, center=opts.center, blocks=opts.blocks,
                    chunk=opts.chunk, ntk=opts.ntk, response_samples=R, progress=bar.update)
            elif plain:
                res = _engine.two_layer_propagator(
                    net.activation, u, w0, kx, _delta(sol, opts.center), train.gamma0,
                    train.lr, center=opts.center, blocks=opts.blocks, chunk=opts.chunk,
                    ntk=opts.ntk, progress=bar.update)
            else:
                res = _engine.objective_propagator(
                    net.activation, u, w0, kx, delta, jac, train.gamma0, train.lr, a=obj.a,
                    decay_to=obj.decay_to, center=opts.center, blocks=opts.blocks,
                    chunk=opts.chunk, ntk=opts.ntk, progress=bar.update)
        finally:
            bar.close()
        if not plain:
            n, C, multi = sol.data.P + sol.data.Q, obj.C, sol.data.multi_output
            for key in ("cov", "pred_cov", "ntk_var", "pred_cov_stderr", "ntk_var_stderr",
                        "kappa"):
                if res.get(key) is not None:
                    res[key] = _output_shape(res[key], n, C, multi)
            T = train.steps
            res["response"] = res["response"].reshape(
                (T + 1, n, C, T, sol.data.P, C) if multi else (T + 1, n, T, sol.data.P))
        if not fast:
            _mask_times(res, state.times, T + 1)
        state.stderr["prediction_cov"] = res["pred_cov_stderr"]
        if opts.ntk:
            state.stderr["ntk_var"] = res["ntk_var_stderr"]
        state.extras["response"] = res["response"]
        state.extras["kappa"] = res["kappa"]
        state.options["samples"] = state.samples
        if fast:
            state.options.update(response_samples=res["response_samples"], sampler=sampler)
            state.extras["block_prediction_cov"] = res["block_pred_cov"]
            if opts.ntk:
                state.extras["block_ntk_var"] = res["block_ntk_var"]
        return res


class _Lazy(FluctuationMethod, name="lazy", options=LazyOptions,
            description="gamma0 -> 0: frozen random kernel, linear dynamics (exact or sampled "
                        "moments)"):
    #: docs/theory.rst §7: the frozen-kernel dynamics f = f(0) + K alpha, alpha(t+1) =
    #: a alpha(t) + lr Delta(t); not decay toward zero (the weights leave the neighbourhood
    #: of their initialisation: no lazy limit) nor the hinge loss (kink)
    supports = frozenset({"outputs", "losses", "weight_decay", "batches"})

    def uses_samples(self, sol, opts):
        return not (opts.moments in ("auto", "exact") and sol.net.linear)

    def compute(self, state):
        sol, opts = state.sol, state.opts
        net, data, train = sol.net, sol.data, sol.train
        if not opts.center and train.gamma0 <= 0:
            raise ValueError(
                "the initial-output variance Phi^1 / gamma0^2 is infinite at gamma0 = 0; "
                "use center=True (the centred model f - f(theta_0)) or a gamma0 > 0")
        g0 = None if opts.center else train.gamma0
        kx = data.kx
        if hasattr(train, "loss") and not _objective(sol).plain:
            return self._compute_objective(state, g0)
        K = np.asarray(sol.ntk[0], dtype=np.float64)
        delta = _engine.lazy_delta(K, np.asarray(data.y_train), train.lr, train.steps)
        use_exact = net.linear and opts.moments in ("auto", "exact")
        if opts.moments == "exact" and not net.linear:
            raise ValueError(f"moments='exact' is available for linear networks only, got "
                             f"activation={net.activation!r}; use moments='sampled'")
        if net.depth != 1 and not use_exact:
            raise NotImplementedError(
                f"sampled lazy moments are implemented for two-layer networks only "
                f"(depth={net.depth}, activation={net.activation!r}): a deep linear network "
                f"uses moments='exact'; a deep nonlinear one needs a method='mc' solution "
                f"and method='deep-propagator'")
        if use_exact:
            kf, kK = (_deep.deep_linear_lazy_kappa(kx, net.depth, g0) if net.depth != 1
                      else _engine.linear_lazy_moments(kx, g0))
            res = _engine.lazy_propagator(K, delta, train.lr, kK, kf)
            state.options["moments"] = "exact"
        else:
            u, w0 = _engine.draw_units(kx, state.samples, state.rng)
            mom = _engine.sampled_lazy_moments(net.activation, u, w0, kx, g0, opts.blocks)
            res = _engine.lazy_propagator(K, delta, train.lr, mom["kappa_K"], mom["kappa_f0"])
            per = [_engine.lazy_propagator(K, delta, train.lr, b["kappa_K"], b["kappa_f0"])
                   for b in mom["blocks"]]
            for key, name in (("pred_cov", "prediction_cov"), ("ntk_var", "ntk_var")):
                arr = np.stack([r[key] for r in per])
                state.stderr[name] = arr.std(axis=0, ddof=1) / np.sqrt(opts.blocks)
            state.options["moments"] = "sampled"
            state.options["samples"] = state.samples
            state.extras["sampled_ntk"] = mom["mean_K"]
        state.extras["lazy_delta"] = delta
        return res

    def _compute_objective(self, state, g0):
        """docs/theory.rst §7: C outputs, any smooth loss, weight decay toward the
        initialisation, batches (:func:`solvers.fluct.lazy.lazy_propagator_objective`)."""
        sol, opts = state.sol, state.opts
        net, data, train = sol.net, sol.data, sol.train
        obj = _objective(sol)
        n, C, multi = data.P + data.Q, obj.C, data.multi_output
        nC = n * C
        use_exact = net.linear and opts.moments in ("auto", "exact")
        if opts.moments == "exact" and not net.linear:
            raise ValueError(f"moments='exact' is available for linear networks only, got "
                             f"activation={net.activation!r}; use moments='sampled'")
        if net.depth != 1 and not (use_exact and C == 1):
            raise ValueError(
                f"the lazy propagator beyond one squared-error output handles depth > 1 only "
                f"for one output of a linear network (exact moments); depth={net.depth}, "
                f"C={C}, activation={net.activation!r}: use method='deep-linear' for a linear "
                f"network")
        K = np.asarray(sol.ntk[0], dtype=np.float64).reshape(nC, nC)
        tr = _engine.lazy_trajectory(K, obj)

        def propagate(kK, kf):
            return _engine.lazy_propagator_objective(K, tr["alpha"], tr["jac"], obj.a,
                                                     train.lr, kK, kf)

        if use_exact:
            kf, kK = (_deep.deep_linear_lazy_kappa(data.kx, net.depth, g0)
                      if net.depth != 1 else _engine.linear_lazy_moments_multi(data.kx, C, g0))
            res = propagate(kK, kf)
            state.options["moments"] = "exact"
        else:
            u, w0 = _engine.draw_units_multi(data.kx, state.samples, C, state.rng)
            mom = _engine.sampled_lazy_moments_multi(net.activation, u, w0, data.kx, g0,
                                                     opts.blocks)
            res = propagate(mom["kappa_K"], mom["kappa_f0"])
            per = [propagate(b["kappa_K"], b["kappa_f0"]) for b in mom["blocks"]]
            for key, name in (("pred_cov", "prediction_cov"), ("ntk_var", "ntk_var")):
                arr = np.stack([r[key] for r in per])
                state.stderr[name] = _output_shape(arr.std(axis=0, ddof=1)
                                                   / np.sqrt(opts.blocks), n, C, multi)
            state.options["moments"] = "sampled"
            state.options["samples"] = state.samples
            state.extras["sampled_ntk"] = _output_shape(mom["mean_K"], n, C, multi)
        for key in ("cov", "pred_cov", "ntk_var"):
            res[key] = _output_shape(res[key], n, C, multi)
        state.extras["lazy_delta"] = tr["delta"] if multi else tr["delta"][..., 0]
        return res

