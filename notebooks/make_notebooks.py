"""Write notebooks/0*.ipynb (without outputs) from the cell sources below.

Run from the repository root: ``python notebooks/make_notebooks.py``. The first code cell of
each notebook sets ``QUICK``; tests/test_notebooks.py executes them with ``QUICK = True``.
"""
import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))

NOTEBOOKS = {
    "01_quickstart.ipynb": [
        ("md", "# dmft quickstart\n\nSolve the infinite-width training dynamics of a network "
               "(DMFT, docs/theory.rst §2), compare with the static NTK and with finite networks, "
               "save and load the result. Conventions: docs/theory.rst §1 (mean-field output scale, "
               "`gamma0` = feature-learning strength)."),
        ("code", "QUICK = False  # the slow test sets QUICK = True (small sizes)"),
        ("code", "import numpy as np\nimport matplotlib.pyplot as plt\nimport dmft\n"
                 "import dmft.config\nimport dmft.plotting\n\n"
                 "P, Q, steps = (4, 4, 15) if QUICK else (8, 8, 40)\n"
                 "data = dmft.config.teacher_student(P=P, Q=Q, D=8, seed=0)\n"
                 "net = dmft.MLP(depth=1, activation='tanh')\n"
                 "train = dmft.GradientDescent(gamma0=1.0, lr=0.1, steps=steps)\n"
                 "data, net, train"),
        ("code", "samples = 8192 if QUICK else 65536\n"
                 "sol = dmft.solve(net, data, train, method='mc', samples=samples, seed=0)\n"
                 "lazy = dmft.solve(net, data, train, method='static')\n"
                 "ens = dmft.simulate(net, data, train, width=256 if QUICK else 1024,\n"
                 "                    seeds=range(4 if QUICK else 16), center=True)\n"
                 "sol"),
        ("code", "fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))\n"
                 "for name, r in [('DMFT', sol), ('static NTK', lazy)]:\n"
                 "    ax[0].semilogy(r.t, r.train_loss, label=name)\n"
                 "    ax[1].plot(r.t, dmft.plotting.ntk_movement(r.ntk), label=name)\n"
                 "m = ens.mean()\n"
                 "ax[0].semilogy(m.t, m.train_loss, 'o', ms=3, label=f'networks N={ens.width}')\n"
                 "ax[1].plot(m.t, dmft.plotting.ntk_movement(ens.ntk).mean(0), 'o', ms=3)\n"
                 "ax[0].set(xlabel='t', title='train loss'); ax[1].set(xlabel='t', "
                 "title='|K(t)-K(0)|/|K(0)|')\n"
                 "ax[0].legend();"),
        ("code", "import os, tempfile\n"
                 "path = os.path.join(tempfile.mkdtemp(), 'run.h5')\n"
                 "sol.save(path)\n"
                 "back = dmft.load(path)\n"
                 "assert np.array_equal(back.train_predictions, sol.train_predictions)\n"
                 "print('prediction stderr (Monte Carlo):', "
                 "sol.stderr['train_predictions'].max())"),
    ],
    "02_deep_linear.ipynb": [
        ("md", "# Deep linear networks\n\nThe DMFT of linear networks closes into matrix "
               "equations (docs/theory.rst §3; `method='linear'`, exact and deterministic). As in the "
               "paper's Figs. 2-3: loss and kernel movement vs depth, and a `gamma0` sweep "
               "comparing the exact solution with the static NTK, the perturbative expansion "
               "(`method='perturbative'`, O(gamma0^2)) and the gradient-independence "
               "approximation (`method='gia'`)."),
        ("code", "QUICK = False  # the slow test sets QUICK = True (small sizes)"),
        ("code", "import numpy as np\nimport matplotlib.pyplot as plt\nimport dmft\n"
                 "import dmft.config\n"
                 "from dmft.plotting import ntk_movement\n\n"
                 "P, Q, steps = (4, 2, 15) if QUICK else (8, 8, 40)\n"
                 "depths = [1, 2] if QUICK else [1, 2, 3, 4]\n"
                 "gammas = [0.1, 0.5] if QUICK else [0.05, 0.1, 0.2, 0.4, 0.8]\n"
                 "data = dmft.config.teacher_student(P=P, Q=Q, D=8, seed=0)\n"
                 "lr = 0.05"),
        ("code", "fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))\n"
                 "for L in depths:\n"
                 "    net = dmft.MLP(depth=L, activation='linear')\n"
                 "    sol = dmft.solve(net, data, dmft.GradientDescent(gamma0=1.0, lr=lr, "
                 "steps=steps))\n"
                 "    ax[0].semilogy(sol.t, sol.train_loss, label=f'L={L}')\n"
                 "    ax[1].plot(sol.t, ntk_movement(sol.ntk), label=f'L={L}')\n"
                 "ax[0].set(title='train loss, gamma0 = 1', xlabel='t')\n"
                 "ax[1].set(title='NTK movement', xlabel='t'); ax[0].legend();"),
        ("md", "Approximations vs `gamma0` (depth 2). The perturbative error falls like "
               "gamma0^4 and the static one like gamma0^2. GIA (Monte Carlo, so its error has "
               "a noise floor of a few 1e-3 here) drops the responses A, B, which matter at "
               "larger gamma0; see benchmarks/README.md."),
        ("code", "net = dmft.MLP(depth=2, activation='linear')\n"
                 "err = {m: [] for m in ('static', 'perturbative', 'gia')}\n"
                 "mov = {m: [] for m in ('linear', 'static', 'perturbative', 'gia')}\n"
                 "for g0 in gammas:\n"
                 "    train = dmft.GradientDescent(gamma0=g0, lr=lr, steps=steps)\n"
                 "    exact = dmft.solve(net, data, train, method='linear')\n"
                 "    mov['linear'].append(ntk_movement(exact.ntk)[-1])\n"
                 "    for m in err:\n"
                 "        # past its range the perturbative method flags itself (status\n"
                 "        # 'not_converged'); throw=False keeps its numbers for the plot\n"
                 "        opts = ({'samples': 4096, 'seed': 0} if m == 'gia' else\n"
                 "                {'throw': False} if m == 'perturbative' else {})\n"
                 "        s = dmft.solve(net, data, train, method=m, **opts)\n"
                 "        err[m].append(np.abs(s.predictions - exact.predictions).max())\n"
                 "        mov[m].append(ntk_movement(s.ntk)[-1])\n"
                 "fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))\n"
                 "for m, e in err.items():\n"
                 "    ax[0].loglog(gammas, e, 'o-', label=m)\n"
                 "for m, e in mov.items():\n"
                 "    ax[1].plot(gammas, e, 'o-', label=m)\n"
                 "ax[0].set(xlabel='gamma0', title='max |f - f_exact|')\n"
                 "ax[1].set(xlabel='gamma0', title='final NTK movement'); ax[0].legend();\n"
                 "slope = np.polyfit(np.log(gammas), np.log(err['perturbative']), 1)[0]\n"
                 "print(f'perturbative error slope {slope:.2f} (theory 4)')"),
    ],
    "03_nonlinear_vs_networks.ipynb": [
        ("md", "# Nonlinear DMFT against finite networks\n\nAs in the paper's Fig. 1: the "
               "alignment A(Phi_theory, Phi_net) = Tr(Phi_T Phi_N)/(|Phi_T||Phi_N|) of the "
               "final last-layer kernel Phi^L(T,T) between theory and simulated networks, vs "
               "width, for the full DMFT and the static NTK."),
        ("code", "QUICK = False  # the slow test sets QUICK = True (small sizes)"),
        ("code", "import numpy as np\nimport matplotlib.pyplot as plt\nimport dmft\n"
                 "import dmft.config\n\n"
                 "P, Q, steps = (4, 4, 15) if QUICK else (8, 8, 40)\n"
                 "widths = [64, 256] if QUICK else [64, 128, 256, 512, 1024, 2048]\n"
                 "seeds = range(3 if QUICK else 8)\n"
                 "data = dmft.config.teacher_student(P=P, Q=Q, D=8, seed=0)\n"
                 "net = dmft.MLP(depth=1, activation='tanh')\n"
                 "train = dmft.GradientDescent(gamma0=1.5, lr=0.05, steps=steps)\n\n"
                 "def alignment(a, b):\n"
                 "    return np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b))"),
        ("code", "full = dmft.solve(net, data, train, method='mc', seed=0,\n"
                 "                  samples=8192 if QUICK else 65536)\n"
                 "lazy = dmft.solve(net, data, train, method='static')\n"
                 "align = {'DMFT': [], 'static': []}\n"
                 "for N in widths:\n"
                 "    ens = dmft.simulate(net, data, train, width=N, seeds=seeds,\n"
                 "                        record_kernels=True, center=True)\n"
                 "    for name, sol in (('DMFT', full), ('static', lazy)):\n"
                 "        align[name].append(np.mean([alignment(sol.phi[-1, -1, -1], k)\n"
                 "                                    for k in ens.phi[:, -1, -1, -1]]))\n"
                 "for name, a in align.items():\n"
                 "    plt.semilogx(widths, a, 'o-', label=name)\n"
                 "plt.xlabel('width N'); plt.ylabel('A(Phi_theory, Phi_N)'); plt.legend();\n"
                 "print({k: np.round(v, 4) for k, v in align.items()})"),
    ],
    "04_fluctuations.ipynb": [
        ("md", "# Finite-width fluctuations\n\n`dmft.fluctuations` gives N Cov of the "
               "predictions at O(1/N) (docs/theory.rst §5; two-layer propagator). Here it is "
               "compared with the variance over simulated networks, N Var f, at a few widths."),
        ("code", "QUICK = False  # the slow test sets QUICK = True (small sizes)"),
        ("code", "import numpy as np\nimport matplotlib.pyplot as plt\nimport dmft\n"
                 "import dmft.config\n\n"
                 "P, Q, steps = (3, 2, 10) if QUICK else (6, 4, 30)\n"
                 "widths = [256] if QUICK else [256, 1024]\n"
                 "seeds = range(16 if QUICK else 200)\n"
                 "data = dmft.config.teacher_student(P=P, Q=Q, D=8, seed=0)\n"
                 "net = dmft.MLP(depth=1, activation='tanh')\n"
                 "train = dmft.GradientDescent(gamma0=1.0, lr=0.1, steps=steps)"),
        ("code", "sol = dmft.solve(net, data, train, method='mc', seed=0,\n"
                 "                 samples=8192 if QUICK else 65536)\n"
                 "fl = dmft.fluctuations(sol, seed=1, samples=4000 if QUICK else 20000)\n"
                 "theory = np.einsum('tii->ti', fl.prediction_cov)   # N Var f_mu(t)\n"
                 "fig, ax = plt.subplots(figsize=(6, 3.5))\n"
                 "ax.plot(sol.t, theory[:, 0], 'k-', label='theory N Var f_0')\n"
                 "for N in widths:\n"
                 "    ens = dmft.simulate(net, data, train, width=N, seeds=seeds)\n"
                 "    ax.plot(sol.t, N * ens.train_predictions[:, :, 0].var(0, ddof=1), 'o', ms=3,\n"
                 "            label=f'networks N={N}')\n"
                 "ax.set(xlabel='t', yscale='log'); ax.legend();"),
    ],
    "05_losses_and_classification.ipynb": [
        ("md", "# Classification: cross-entropy over C outputs, lazy and rich\n\n"
               "A small multi-class task (handwritten digits from scikit-learn) trained with the "
               "softmax cross-entropy over C outputs (docs/theory.rst §7): `Dataset.from_labels` "
               "builds one-hot targets, `GradientDescent(loss='cross_entropy')` trains on them. "
               "The lazy regime (`method='static'`, the gamma0 -> 0 limit) keeps the outputs "
               "decoupled (K_{mu c, nu c'}(t) = delta_cc' K0_{mu nu}); feature learning "
               "(gamma0 = 1, `method='mc'`) couples them and moves the kernel. DMFT beside "
               "finite networks of the same convention (`dmft.simulate`)."),
        ("code", "QUICK = False  # the slow test sets QUICK = True (small sizes)"),
        ("code", "import numpy as np\nimport matplotlib.pyplot as plt\nimport dmft\n"
                 "from sklearn.datasets import load_digits\n\n"
                 "C = 3 if QUICK else 10                 # classes (digits 0 .. C-1)\n"
                 "per_class = (3, 3) if QUICK else (2, 2)  # train, test points per class\n"
                 "steps = 15 if QUICK else 25\n"
                 "X, labels = load_digits(return_X_y=True)\n"
                 "rng = np.random.default_rng(0)\n"
                 "tr, te = [], []\n"
                 "for c in range(C):\n"
                 "    idx = rng.permutation(np.flatnonzero(labels == c))\n"
                 "    tr += list(idx[:per_class[0]]); te += list(idx[per_class[0]:sum(per_class)])\n"
                 "X = X - X.mean(0)\n"
                 "X = X / np.linalg.norm(X, axis=1, keepdims=True) * np.sqrt(X.shape[1])  # |x|^2/D = 1\n"
                 "data = dmft.Dataset.from_labels(X[tr], labels[tr], X[te], labels[te], classes=C)\n"
                 "net = dmft.MLP(depth=1, activation='tanh')\n"
                 "lazy = dmft.solve(net, data, dmft.GradientDescent(gamma0=1.0, lr=0.1, steps=1,\n"
                 "                  loss='cross_entropy'), method='static')\n"
                 "K0 = lazy.ntk[0].reshape(data.P + data.Q, C, -1, C)[:data.P, 0, :data.P, 0]\n"
                 "lr = round(float(1.0 / np.linalg.eigvalsh(K0)[-1]), 3)   # half the stable rate\n"
                 "print(data, 'lr =', lr)"),
        ("code", "# lazy: the static NTK (gamma0 -> 0) beside networks at gamma0 = 0.1; rich: DMFT\n"
                 "# (method='mc') beside networks at gamma0 = 1. Networks are centred (f - f(0)):\n"
                 "# their random initial output, O(1 / (gamma0 sqrt(N))), is not part of the limit.\n"
                 "width, seeds = (256, range(4)) if QUICK else (1024, range(8))\n"
                 "runs = {}\n"
                 "for gamma0 in (0.1, 1.0):\n"
                 "    train = dmft.GradientDescent(gamma0=gamma0, lr=lr, steps=steps, "
                 "loss='cross_entropy')\n"
                 "    if gamma0 < 0.5:\n"
                 "        sol = dmft.solve(net, data, train, method='static')\n"
                 "    else:\n"
                 "        sol = dmft.solve(net, data, train, method='mc', seed=0,\n"
                 "                         samples=4096 if QUICK else 32768)\n"
                 "    ens = dmft.simulate(net, data, train, width=width, seeds=seeds, center=True)\n"
                 "    runs[gamma0] = (sol, ens)\n"
                 "runs[0.1][0].method, runs[1.0][0].method"),
        ("code", "fig, ax = plt.subplots(1, 3, figsize=(14, 3.6))\n"
                 "for (gamma0, (sol, ens)), col in zip(runs.items(), ('C0', 'C3')):\n"
                 "    m = ens.mean()\n"
                 "    ax[0].plot(sol.t, sol.test_loss, col, label=f'{sol.method} gamma0={gamma0}')\n"
                 "    ax[0].plot(m.t, ens.test_loss.mean(0), col + 'o', ms=3,\n"
                 "               label=f'networks N={ens.width}')\n"
                 "    ax[1].plot(sol.t, sol.test_accuracy, col)\n"
                 "    ax[1].plot(m.t, ens.test_accuracy.mean(0), col + 'o', ms=3)\n"
                 "    # kernel movement and the coupling of different outputs\n"
                 "    K = sol.ntk.reshape(sol.t.size, data.P + data.Q, C, data.P + data.Q, C)\n"
                 "    off = np.abs(K[:, :, 0, :, 1]).max(axis=(1, 2)) / np.abs(K[0, :, 0, :, 0]).max()\n"
                 "    ax[2].plot(sol.t, off, col, label=f'gamma0={gamma0}')\n"

                 "ax[0].set(xlabel='t', title='test cross-entropy'); ax[0].legend(fontsize=7)\n"
                 "ax[1].set(xlabel='t', title='test accuracy')\n"
                 "ax[2].set(xlabel='t', title='max |K_{mu 0, nu 1}(t)| / max |K_{mu 0, nu 0}(0)|')\n"
                 "ax[2].legend();"),
        ("code", "for gamma0, (sol, ens) in runs.items():\n"
                 "    se = sol.stderr['test_predictions'][-1].max() if sol.stderr else 0.0\n"
                 "    gap = np.abs(sol.test_predictions[-1] - ens.mean().test_predictions[-1]).max()\n"
                 "    print(f'gamma0={gamma0} ({sol.method}): final test accuracy {sol.test_accuracy[-1]:.2f}, '\n"
                 "          f'networks {ens.test_accuracy[:, -1].mean():.2f}; max |f_DMFT - f_N| = '\n"
                 "          f'{gap:.3f} (Monte Carlo stderr {se:.3f}; finite width adds O(1/sqrt(N S)) '\n"
                 "          f'and O(gamma0^2) for the static NTK at gamma0 > 0)')"),
    ],
}


def build(directory=HERE):
    paths = []
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook(cells=[new_markdown_cell(src) if kind == "md" else new_code_cell(src)
                                 for kind, src in cells])
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                     "language": "python"}
        path = os.path.join(directory, name)
        nbformat.write(nb, path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in build():
        print("wrote", p)
