"""A strict stand-in for CuPy, backed by NumPy: the CuPy backend tested on machines without a GPU.

`ndarray` wraps a NumPy array that plays the part of device memory. It behaves like `cupy.ndarray` where a
backend bug would show, and is stricter where being strict costs nothing:

* NumPy cannot see into it: `np.asarray(a)` raises TypeError, as CuPy's `__array__` does ("Implicit
  conversion to a NumPy array is not allowed"), and NumPy's ufuncs and functions (`np.exp(a)`,
  `np.concatenate([a, b])`) refuse it. (Stricter than CuPy, which dispatches many of them to CuPy through
  `__array_ufunc__` / `__array_function__`: here a NumPy call on a device array is always a host-side
  leak in the code under test.)
* Mixing a device array with a NumPy array in an operator or a `cupy.*` function raises TypeError, as
  CuPy's kernels do ("Unsupported type <class 'numpy.ndarray'>"). Python and NumPy scalars are fine.
* Reductions and integer indexing return 0-d device arrays, not scalars, as in CuPy; `int()`, `float()`,
  `bool()`, `.item()`, `.tolist()` and `.get()` are the explicit (synchronising) ways back to the host.
* Indexing with a NumPy array, and assigning a NumPy array into a device array, are refused. CuPy may
  accept both (copying the host array to the device), but its documentation does not promise it and it
  could not be checked here, so the stand-in is strict: index with device arrays (`xp.asarray(idx)`),
  Python ints, slices or lists. (Out-of-bounds indices raise IndexError here; CuPy wraps them silently,
  which is why qwen2np checks ids on the host first.)
* `cupy.asarray` / `cupy.array` accept NumPy arrays, lists and scalars and copy them "to the device";
  `cupy.asnumpy(a)` and `a.get()` copy back. `transfers` counts the copies each way, so a test can see a
  device -> host copy (each one a synchronisation on a GPU) where none should be.

Every computation is the same NumPy kernel on the same memory layout as the NumPy backend runs, so a model
moved to the stand-in must give bitwise the same numbers: any difference is a code path that differs.

Use it by putting this module in `sys.modules["cupy"]` (see the `cupy` fixture in test_backend_cupy.py).
"""

import sys

import numpy as np

# dtypes, type helpers and constants are NumPy's own in CuPy too (re-exported: cupy.float32 is np.float32)
from numpy import (bool_, can_cast, dtype, e, finfo, float16, float32, float64, iinfo, inf, int8,  # noqa: F401
                   int16, int32, int64, intp, issubdtype, nan, newaxis, pi, promote_types, result_type, uint8)

__version__ = "13.0.0-standin"

# copies between host and device, counted so that tests can see hidden synchronisations: on a GPU, each
# device -> host copy (get, item, int(), bool(), …) waits for every kernel queued before it
transfers = {"to_host": 0, "to_device": 0}

_IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. "
             "Please use `.get()` to construct a NumPy array explicitly.")
_SCALARS = (bool, int, float, complex, np.generic)


def _refuse_host(x, where):
    raise TypeError(f"Unsupported type {type(x)} {where}: a NumPy array cannot be mixed with a cupy array "
                    f"(move it with cupy.asarray first)")


def _operand(x, where="as an operand"):
    """An operator's other operand as the NumPy value to compute with: device arrays and scalars only."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, _SCALARS):
        return x
    _refuse_host(x, where)


def _unwrap(x, where="as an argument"):
    """Arguments of a cupy function: device arrays unwrapped, NumPy arrays refused, containers walked."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, np.ndarray):
        _refuse_host(x, where)
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v, where) for v in x)
    return x


def _wrap(r):
    """A NumPy result as the device result CuPy gives: arrays (and NumPy scalars, as 0-d arrays) on the device."""
    if isinstance(r, np.ndarray):
        return ndarray._of(r)
    if isinstance(r, np.generic):
        return ndarray._of(np.asarray(r))
    if isinstance(r, (tuple, list)):
        return type(r)(_wrap(v) for v in r)
    return r


def _index(key):
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    if isinstance(key, ndarray):
        return key._a
    if isinstance(key, np.ndarray):
        raise TypeError("a cupy array indexed with a NumPy array: the stand-in is strict here (CuPy's "
                        "documentation does not promise it); index with cupy.asarray(index)")
    return key


def _read_on_host(convert):
    """A method returning `convert(values)`, counted as a device -> host copy."""
    def method(self):
        transfers["to_host"] += 1
        return convert(self._a)
    return method


class ndarray:
    """A device array: a NumPy array that only this module looks into.

    `ndarray(shape, dtype)` makes an uninitialised one, as `cupy.ndarray` does.
    """

    __slots__ = ("_a",)

    def __init__(self, shape, dtype=float):
        self._a = np.empty(shape, dtype=dtype)

    @classmethod
    def _of(cls, a):
        """Wrap the NumPy array `a` (the device memory), without copying it."""
        self = object.__new__(cls)
        self._a = a
        return self

    # -- what NumPy may not do with it: np.asarray(a), np.exp(a), np.concatenate([a]), np_array + a -------

    def __array__(self, dtype=None, copy=None):
        raise TypeError(_IMPLICIT)

    # NEP 13's opt-out: NumPy ufuncs refuse the array, and NumPy's operators (of an array or a scalar) give
    # way to ours, which take scalars and refuse NumPy arrays
    __array_ufunc__ = None

    def __array_function__(self, func, types, args, kwargs):
        raise TypeError(f"numpy.{func.__name__} called on a cupy array: use the cupy function "
                        f"(array_module(x).{func.__name__}), or move the array to the host with .get()")

    # -- attributes -------------------------------------------------------------------------------------

    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: ndarray._of(self._a.T))

    # -- back to the host, explicitly -------------------------------------------------------------------

    def get(self, stream=None, order="C", out=None):
        """A NumPy copy of the values (device -> host)."""
        transfers["to_host"] += 1
        if out is not None:
            out[...] = self._a
            return out
        return np.array(self._a, order=order, copy=True)

    def set(self, arr, stream=None):
        """Copy a NumPy array into this device array (host -> device)."""
        transfers["to_device"] += 1
        self._a[...] = np.asarray(arr)

    # each of these reads values on the host: one device -> host copy
    item = _read_on_host(np.ndarray.item)
    tolist = _read_on_host(np.ndarray.tolist)
    __int__ = _read_on_host(int)
    __float__ = _read_on_host(float)
    __complex__ = _read_on_host(complex)
    __bool__ = _read_on_host(bool)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(self.shape[0]))

    def __repr__(self):
        return repr(self._a)

    def __str__(self):
        return str(self._a)

    def __format__(self, spec):
        transfers["to_host"] += 1
        return format(self._a, spec)

    # -- indexing ---------------------------------------------------------------------------------------

    def __getitem__(self, key):
        return _wrap(self._a[_index(key)])

    def __setitem__(self, key, value):
        self._a[_index(key)] = _operand(value, "assigned into a cupy array")

    __hash__ = None

    def __neg__(self):
        return ndarray._of(-self._a)

    def __pos__(self):
        return ndarray._of(+self._a)

    def __abs__(self):
        return ndarray._of(np.absolute(self._a))

    def __invert__(self):
        return ndarray._of(~self._a)


ndarray.__module__ = "cupy._core.core"   # what qwen2np.weights.backend.array_module looks at, as for the real class


def _method(name):
    def method(self, *args, **kwargs):
        out = kwargs.get("out")
        r = getattr(self._a, name)(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()})
        if out is not None:
            return out
        if r is self._a:      # astype(copy=False) to the same dtype, …: the array itself
            return self
        return _wrap(r)

    method.__name__ = name
    return method


for _name in ("reshape", "transpose", "swapaxes", "astype", "copy", "squeeze", "ravel", "flatten", "view",
              "sum", "max", "min", "mean", "prod", "std", "var", "argmax", "argmin", "any", "all", "cumsum",
              "clip", "nonzero", "take", "repeat", "round", "dot", "fill", "sort", "argsort", "conj"):
    setattr(ndarray, _name, _method(_name))


def _binary(op):
    def forward(self, other):
        return _wrap(op(self._a, _operand(other)))

    def reflected(self, other):
        return _wrap(op(_operand(other), self._a))

    def inplace(self, other):
        op(self._a, _operand(other), out=self._a)
        return self

    return forward, reflected, inplace


for _name, _op in (("add", np.add), ("sub", np.subtract), ("mul", np.multiply), ("truediv", np.true_divide),
                   ("floordiv", np.floor_divide), ("mod", np.remainder), ("pow", np.power),
                   ("matmul", np.matmul), ("and", np.bitwise_and), ("or", np.bitwise_or),
                   ("xor", np.bitwise_xor), ("lshift", np.left_shift), ("rshift", np.right_shift)):
    for _prefix, _f in zip(("", "r", "i"), _binary(_op)):
        setattr(ndarray, f"__{_prefix}{_name}__", _f)
for _name, _op in (("lt", np.less), ("le", np.less_equal), ("eq", np.equal), ("ne", np.not_equal),
                   ("gt", np.greater), ("ge", np.greater_equal)):
    setattr(ndarray, f"__{_name}__", _binary(_op)[0])


# -- moving data ------------------------------------------------------------------------------------------


def array(obj, dtype=None, copy=True, order="K", ndmin=0):
    """A new device array: from a device array, or copied from host data (NumPy arrays, lists, scalars)."""
    if isinstance(obj, ndarray):
        return ndarray._of(np.array(obj._a, dtype=dtype, copy=copy or None, order=order, ndmin=ndmin))
    host = np.array(_unwrap_nested(obj), dtype=dtype, copy=True, order=order, ndmin=ndmin)   # host -> device
    transfers["to_device"] += 1
    return ndarray._of(host)


def asarray(a, dtype=None, order=None):
    """`a` itself when it is a device array of that dtype; otherwise a device copy."""
    if isinstance(a, ndarray):
        return a if dtype is None or np.dtype(dtype) == a.dtype else ndarray._of(a._a.astype(dtype))
    return array(a, dtype=dtype, order=order or "K")


asanyarray = asarray


def _unwrap_nested(obj):
    """Host data for `array`: lists may mix Python values and (0-d) device arrays, as CuPy allows."""
    if isinstance(obj, ndarray):
        return obj._a
    if isinstance(obj, (list, tuple)):
        return [_unwrap_nested(v) for v in obj]
    return obj


def asnumpy(a, stream=None, order="C", out=None):
    """A NumPy array with the values of `a` (copied from the device when `a` is a device array)."""
    if isinstance(a, ndarray):
        return a.get(order=order, out=out)
    return np.asarray(a, order=order)


def get_array_module(*args):
    for a in args:
        if isinstance(a, ndarray):
            return sys.modules[__name__]
    return np


# -- everything else: NumPy's function, on device arrays only ------------------------------------------------


def _delegate(name):
    f = getattr(np, name)

    def function(*args, **kwargs):
        out = kwargs.get("out")
        r = f(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()})
        return out if isinstance(out, ndarray) else _wrap(r)

    function.__name__ = function.__qualname__ = name
    function.__doc__ = f"cupy.{name}: numpy.{name} on device arrays (NumPy arrays are refused)."
    return function


_FUNCTIONS = (
    # creation
    "empty", "zeros", "ones", "full", "arange", "linspace", "eye", "tri", "empty_like", "zeros_like",
    "ones_like", "full_like",
    # shapes and joins
    "concatenate", "stack", "broadcast_to", "reshape", "transpose", "swapaxes", "squeeze", "expand_dims",
    "split", "repeat", "tile", "tril", "triu", "ascontiguousarray",
    # elementwise
    "where", "exp", "log", "log1p", "expm1", "sqrt", "tanh", "cos", "sin", "abs", "absolute", "maximum",
    "minimum", "negative", "divide", "true_divide", "subtract", "multiply", "add", "power", "square", "sign",
    "floor", "ceil", "rint", "clip", "isfinite", "isnan", "isinf", "logical_and", "logical_or",
    "logical_not", "equal", "not_equal", "less", "less_equal", "greater", "greater_equal",
    # products, reductions, scans, sorting, searching
    "matmul", "dot", "einsum", "sum", "mean", "prod", "max", "min", "amax", "amin", "argmax", "argmin",
    "any", "all", "cumsum", "sort", "argsort", "partition", "argpartition", "nonzero", "flatnonzero",
    "argwhere", "searchsorted", "isin", "take", "take_along_axis", "array_equal", "allclose",
)
# (they shadow the builtins abs, max, min, sum, any, all below this point, as `from cupy import *` would)
for _name in _FUNCTIONS:
    globals()[_name] = _delegate(_name)
del _name
