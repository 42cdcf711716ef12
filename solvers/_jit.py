"""Numba options, set in one place.

- ``cache=True``: compiled machine code is written next to the module (``__pycache__``) so the
  seconds of LLVM compilation are paid once per machine, not once per process.
- ``error_model="numpy"``: division by zero gives inf/nan as in NumPy instead of raising;
  the engines check results for non-finite values themselves and raise a clear error.
- ``fastmath`` is *off*: the engines rely on IEEE semantics for NaN detection and on exact
  reproducibility for a fixed seed.
- ``nogil=True``: kernels release the GIL so callers may run chunks in threads.
"""
import numba

JIT_OPTIONS = dict(cache=True, error_model="numpy", nogil=True)

#: scalar helpers called from other kernels: inlined by LLVM anyway
jit = numba.njit(**JIT_OPTIONS)


def njit(*args, **kwargs):
    """``numba.njit`` with the package's options (extra kwargs override)."""
    opts = dict(JIT_OPTIONS)
    opts.update(kwargs)
    if args and callable(args[0]):
        return numba.njit(**opts)(args[0])
    return numba.njit(*args, **opts)
