"""Plain values <-> JSON text for HDF5 attributes (:mod:`dmft.io`).

Exact for bool, int, float (nan and inf included), str, None, tuples, lists, dicts with string
keys, NumPy arrays of numeric or string dtype and ``numpy.random.SeedSequence``; anything else
raises ValueError naming where it stood. JSON longer than an HDF5 attribute can hold goes to a
string dataset ``__name`` instead.
"""
from __future__ import annotations

import json

import h5py
import numpy as np

__all__ = ["dumps", "loads", "put_json", "get_json"]


def _to_jsonable(value, where):
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, np.random.SeedSequence):
        return {"__seedsequence__": {"entropy": _to_jsonable(value.entropy, where),
                                     "spawn_key": list(value.spawn_key),
                                     "pool_size": int(value.pool_size)}}
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biufU":
            raise ValueError(f"{where}: cannot store an array of dtype {value.dtype}; "
                             f"convert it to a numeric array")
        return {"__ndarray__": value.tolist(), "dtype": value.dtype.str,
                "shape": list(value.shape)}
    if isinstance(value, tuple):
        return {"__tuple__": [_to_jsonable(v, where) for v in value]}
    if isinstance(value, (list, range)):
        return [_to_jsonable(v, where) for v in value]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: dict keys must be strings to be saved, got {k!r}")
            if k.startswith("__"):
                raise ValueError(f"{where}: dict keys may not start with '__' (reserved), "
                                 f"got {k!r}")
            out[k] = _to_jsonable(v, f"{where}[{k!r}]")
        return out
    raise ValueError(f"{where}: cannot save a value of type {type(value).__name__} "
                     f"({value!r}); use numbers, strings, booleans, None, lists, dicts or "
                     f"NumPy arrays")


def _from_jsonable(obj):
    if isinstance(obj, list):
        return [_from_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        if "__tuple__" in obj:
            return tuple(_from_jsonable(v) for v in obj["__tuple__"])
        if "__ndarray__" in obj:
            return np.array(obj["__ndarray__"], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"])
        if "__seedsequence__" in obj:
            d = obj["__seedsequence__"]
            return np.random.SeedSequence(_from_jsonable(d["entropy"]),
                                          spawn_key=tuple(d["spawn_key"]),
                                          pool_size=d["pool_size"])
        return {k: _from_jsonable(v) for k, v in obj.items()}
    return obj


def dumps(value, where) -> str:
    return json.dumps(_to_jsonable(value, where), allow_nan=True)


def loads(text):
    return _from_jsonable(json.loads(text))


#: HDF5 object headers hold at most 64 KiB of attributes; longer JSON goes to a dataset
_MAX_ATTR_BYTES = 32768


def put_json(group, name, value, where):
    """Store ``value`` as JSON text in attribute ``name`` (or dataset ``__name`` when long)."""
    text = dumps(value, where)
    if len(text.encode("utf-8")) <= _MAX_ATTR_BYTES:
        group.attrs[name] = text
    else:
        group.create_dataset("__" + name, data=text, dtype=h5py.string_dtype("utf-8"))


def get_json(tree, name, default="null"):
    if name in tree["attrs"]:
        text = tree["attrs"][name]
    elif "__" + name in tree["datasets"]:
        text = tree["datasets"]["__" + name][()]
        text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
    else:
        text = default
    try:
        return loads(text)
    except ValueError as exc:  # json.JSONDecodeError included
        raise ValueError(f"attribute {name!r} is not valid JSON ({exc})") from None
