"""Checkpoint loading that runs no code from the file, changes no state, and stays bounded.

torch >= 2.6 loads with ``weights_only=True`` by default, and mmengine 0.10.7 (the release mmdet
3.3 needs) calls ``torch.load`` without the argument, so stock mmengine cannot read its own
checkpoints (their ``meta``/``message_hub`` carry ``HistoryBuffer``, numpy scalars, arrays and
dtypes). Allow-listing those classes for torch's weights-only unpickler is not enough: it runs
the classes' own ``__setstate__`` (``HistoryBuffer``'s writes its class-level statistics table,
and any attribute of the file's choosing lands on the instance), numpy's array constructor
builds zero-stride arrays of any size, ``torch.Tensor(2**40)`` and ``bytearray(2**40)`` are on
torch's default list, and a few bytes of shared nesting expand exponentially for the code that
walks the result.

**One mechanism** (:func:`restricted_load`): ``torch.load`` with our own unpickler
(:class:`RestrictedUnpickler`). Every global the file names is looked up in one table,
:data:`CHECKPOINT_GLOBALS`, of *reconstructors*: functions (or record classes) that check
their arguments' types and sizes and build the object from known fields only. Nothing else is
importable, no class's own ``__setstate__``/``__reduce__`` code runs, and ``BUILD`` only fills
our records. Allow-listed types are rebuilt as follows:

* tensors and parameters: torch's rebuild functions, after checking the view fits its storage
  and is no larger than it (no huge zero-stride views), without hooks or tensor attributes;
  declared storage sizes together must fit in the file;
* numpy arrays: shape, dtype, order and the raw bytes, which must be exactly the array's size
  (so an array is never larger than its data in the file); numpy scalars: dtype + bytes;
  dtypes: bool, int, float and complex codes with a byte order;
* ``HistoryBuffer``: its public constructor from ``_log_history``, ``_count_history`` (1-D
  numeric arrays of one length) and ``max_length``; the pickled ``statistics_methods`` must be
  the four default methods under their own names and are not applied (class state untouched);
* ``argparse.Namespace`` (the ``args`` of the original DETR-family ``.pth`` files): plain-data
  attributes;
* containers and scalars (dict, OrderedDict, Counter, list, tuple, set, str, bytes, numbers),
  ``torch.Size``, ``torch.device``, torch dtypes.

After unpickling, one iterative pass over the result (:func:`_finalize`) turns the records into
the real objects and bounds the structure: nesting depth at most :data:`MAX_NESTING_DEPTH`, at
most :data:`MAX_EXPANDED_NODES` nodes when shared objects are counted once per reference (the
work of any code that walks the result as a tree, such as ``Optimizer.load_state_dict``), and no
reference cycles. Any refusal is an :class:`UnsafeCheckpointError` naming the file and what was
refused; malformed data is a :class:`CorruptCheckpointError`.

Importing ``mmdet_detrx`` (:func:`patch_mmengine_checkpoint_loading`) makes mmengine's local and
``http(s)://`` checkpoint loaders use it (and OneDL mmengine's ``_safe_torch_load``, whose own
fallback is ``weights_only=False``), and makes ``Runner.resume`` ignore the checkpoint's
``meta['config']`` text, which mmengine would execute with ``Config.fromstring``
(:func:`patch_runner_resume`), and makes ``BaseInferencer`` without a config (mmdet's
``DetInferencer(weights=ckpt)``) read the stored config as data (:func:`patch_inferencer_config`,
``utils/literal_config.py``) instead of executing it. ``MMDET_DETRX_TRUSTED_CHECKPOINTS=1`` (or ``--trust-checkpoint``
on our tools) is the explicit opt-in for trusted legacy pickles: full pickle loading. Other
schemes (``torchvision://``, ``open-mmlab://``, ``s3://``, ...) keep mmengine's own code.
"""
import _compat_pickle
import argparse
import ast
import functools
import io
import logging
import math
import os
import os.path as osp
import pickle
import struct
import tarfile
import types
import zipfile
from collections import Counter, OrderedDict
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from mmengine.logging import HistoryBuffer, print_log
from mmengine.runner.checkpoint import CheckpointLoader

__all__ = [
    'CHECKPOINT_GLOBALS', 'CorruptCheckpointError', 'MAX_EXPANDED_NODES', 'MAX_NESTING_DEPTH',
    'RestrictedUnpickler', 'TRUSTED_CHECKPOINTS_ENV', 'UnsafeCheckpointError',
    'inert_checkpoint_config', 'load_checkpoint_file', 'mmengine_checkpoint_globals',
    'patch_inferencer_config', 'patch_mmengine_checkpoint_loading', 'patch_runner_resume',
    'restricted_load',
    'safe_torch_load', 'trusted_checkpoints'
]

TRUSTED_CHECKPOINTS_ENV = 'MMDET_DETRX_TRUSTED_CHECKPOINTS'

#: Deepest nesting of containers/objects a loaded checkpoint may have (real ones: < 10).
MAX_NESTING_DEPTH = 64
#: Most nodes of the loaded object counted as a tree (a shared object once per reference).
#: Real checkpoints have thousands to tens of thousands; the bound keeps any code that walks
#: the result without a memo (torch's optimizer state casting, deepcopy-free recursions) linear.
MAX_EXPANDED_NODES = 2**22
#: A tensor may be a view with more elements than its storage (zero strides) only up to this.
MAX_BROADCAST_ELEMENTS = 2**20
_MAX_NDIM = 32
# Slack over the file size for the storage sizes a file may declare (headers, alignment).
_STORAGE_SLACK_BYTES = 1 << 16

_NUMPY_MULTIARRAY = ('numpy.core.multiarray', 'numpy._core.multiarray')
# dtypes mmengine's message hub and schedulers store: bool, integers, floats, complex.
_NUMPY_DTYPE_CODES = '?bBhHiIlLqQefdgFDG'
_HISTORY_BUFFER_STATISTICS = ('min', 'max', 'current', 'mean')
_HISTORY_BUFFER_FIELDS = ('max_length', '_log_history', '_count_history')

_PATCHED = False


class UnsafeCheckpointError(RuntimeError):
    """Loading the checkpoint would need something outside the allow-list or its bounds."""


class CorruptCheckpointError(pickle.UnpicklingError):
    """The checkpoint's pickle data is malformed (truncated, inconsistent)."""


class _Refusal(Exception):
    """Raised by a reconstructor; :func:`restricted_load` adds the file name."""


def trusted_checkpoints() -> bool:
    """Whether the user opted in to full-pickle loading (``MMDET_DETRX_TRUSTED_CHECKPOINTS=1``)."""
    return os.environ.get(TRUSTED_CHECKPOINTS_ENV, '').strip().lower() in ('1', 'true', 'yes')


def _type_name(value) -> str:
    return type(value).__name__


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise _Refusal(message)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- records: inert stand-ins that the unpickler fills and _finalize turns into objects ------

class _Record:
    """Built by a reconstructor during unpickling, filled by at most one ``BUILD``; never the
    real object. :meth:`fields` are finalised first, then :meth:`resolve` builds the object."""
    what = 'object'
    built = False

    def build(self, state) -> None:
        raise _Refusal(f'BUILD (setting state) of a {self.what} is not allowed')

    def _build_once(self) -> None:
        _check(not self.built, f'a second BUILD of one {self.what}')
        self.built = True

    def fields(self) -> List[Any]:
        return []

    def resolve(self, fields: List[Any]):
        raise _Refusal(f'a {self.what} cannot appear in a checkpoint on its own')


class _NdarrayType(_Record):
    """What the global ``numpy.ndarray`` stands for: an argument of ``_reconstruct`` only
    (``ndarray(shape, dtype, buffer, offset, strides)`` would build views of any size)."""
    what = 'numpy.ndarray class'

    def __new__(cls, *args, **kwargs):
        raise _Refusal('numpy.ndarray(...) construction (shape/strides from the file) is not '
                       'allowed; arrays are rebuilt only from their pickled data')


class _DtypeRecord(_Record):
    what = 'numpy dtype'
    _codes = None

    @classmethod
    def allowed_codes(cls) -> Dict[str, np.dtype]:
        if cls._codes is None:
            dtypes = [np.dtype(code) for code in _NUMPY_DTYPE_CODES]
            # the names numpy pickles ('f8', 'b1', ...), each to its canonical dtype
            cls._codes = {name: np.dtype(name) for name in {f'{d.kind}{d.itemsize}'
                                                            for d in dtypes}}
        return cls._codes

    def __init__(self, code, align=False, copy=True) -> None:
        codes = self.allowed_codes()
        _check(isinstance(code, str) and code in codes,
               f'numpy dtype {code!r}: only {sorted(codes)} (bool, int, float, complex)')
        _check(isinstance(align, bool) and isinstance(copy, bool),
               'numpy dtype flags must be booleans')
        self.dtype = codes[code]

    def build(self, state) -> None:
        self._build_once()
        _check(isinstance(state, tuple) and len(state) in (8, 9),
               f'numpy dtype state of type {_type_name(state)}')
        version, byteorder, *rest = state
        expected = [None, None, None, -1, -1, 0] + ([None] if len(state) == 9 else [])
        _check(version in (3, 4) and byteorder in ('<', '>', '|', '=') and rest == expected,
               'numpy dtype state other than a plain dtype with a byte order')
        if byteorder in ('<', '>') and self.dtype.itemsize > 1:
            self.dtype = self.dtype.newbyteorder(byteorder)

    def resolve(self, fields):
        return self.dtype


class _ArrayRecord(_Record):
    what = 'numpy array'

    def __init__(self) -> None:
        self.array = None

    def build(self, state) -> None:
        self._build_once()
        _check(isinstance(state, tuple) and len(state) == 5,
               f'numpy array state of type {_type_name(state)}')
        version, shape, dtype, is_fortran, data = state
        _check(version == 1, f'numpy array state version {version!r}')
        _check(isinstance(shape, tuple) and len(shape) <= _MAX_NDIM
               and all(_is_int(n) and n >= 0 for n in shape),
               f'numpy array shape {shape!r} (at most {_MAX_NDIM} non-negative ints)')
        _check(isinstance(dtype, _DtypeRecord), 'numpy array dtype is not a plain dtype')
        _check(isinstance(is_fortran, bool), 'numpy array order flag is not a bool')
        _check(isinstance(data, (bytes, bytearray)),
               f'numpy array data of type {_type_name(data)} (only raw bytes)')
        nbytes = math.prod(shape) * dtype.dtype.itemsize
        _check(len(data) == nbytes, f'numpy array of shape {shape} and dtype {dtype.dtype} '
               f'needs {nbytes} bytes of data, the file gives {len(data)}')
        flat = np.frombuffer(bytes(data), dtype=dtype.dtype)
        self.array = flat.reshape(shape, order='F' if is_fortran else 'C').copy(order='K')

    def resolve(self, fields):
        _check(self.array is not None, 'a numpy array without data')
        return self.array


class _StatisticRef(_Record):
    what = 'getattr(HistoryBuffer, ...) reference'

    def __init__(self, name: str) -> None:
        self.name = name


class _HistoryBufferRecord(_Record):
    what = 'HistoryBuffer'

    def __init__(self, *args) -> None:
        _check(not args, 'HistoryBuffer created with arguments')
        self.state = None

    def build(self, state) -> None:
        self._build_once()
        _check(isinstance(state, dict) and all(isinstance(k, str) for k in state),
               f'HistoryBuffer state of type {_type_name(state)}')
        unknown = set(state) - set(_HISTORY_BUFFER_FIELDS) - {'statistics_methods'}
        _check(not unknown, f'HistoryBuffer fields {sorted(unknown)}: only '
               f'{list(_HISTORY_BUFFER_FIELDS)} (and the default statistics_methods) are known')
        missing = set(_HISTORY_BUFFER_FIELDS) - set(state)
        _check(not missing, f'HistoryBuffer without {sorted(missing)}')
        methods = state.get('statistics_methods', {})
        _check(isinstance(methods, dict) and all(
            isinstance(ref, _StatisticRef) and ref.name == name for name, ref in methods.items()),
            'HistoryBuffer statistics_methods other than the default methods under their own '
            f'names {_HISTORY_BUFFER_STATISTICS}')
        self.state = state

    def fields(self):
        _check(self.state is not None, 'a HistoryBuffer without state')
        return [self.state[name] for name in _HISTORY_BUFFER_FIELDS]

    def resolve(self, fields):
        max_length, log_history, count_history = fields
        _check(_is_int(max_length) and max_length >= 1,
               f'HistoryBuffer max_length {max_length!r} (an int >= 1)')
        for name, array in (('_log_history', log_history), ('_count_history', count_history)):
            _check(isinstance(array, np.ndarray) and array.ndim == 1 and array.dtype.kind in
                   'biuf', f'HistoryBuffer {name} is not a 1-D numeric numpy array')
        _check(len(log_history) == len(count_history),
               'HistoryBuffer _log_history and _count_history differ in length')
        return HistoryBuffer(log_history, count_history, max_length)


class _NamespaceRecord(_Record):
    what = 'argparse.Namespace'

    def __init__(self, *args) -> None:
        _check(not args, 'argparse.Namespace created with arguments')
        self.names, self.values = [], []

    def build(self, state) -> None:
        self._build_once()
        _check(isinstance(state, dict), f'argparse.Namespace state of type {_type_name(state)}')
        for name, value in state.items():
            _check(isinstance(name, str) and name.isidentifier() and not name.startswith('__'),
                   f'argparse.Namespace attribute {name!r}')
            self.names.append(name)
            self.values.append(value)

    def fields(self):
        return self.values

    def resolve(self, fields):
        return argparse.Namespace(**dict(zip(self.names, fields)))


# --- reconstructors: what each allowed global name stands for --------------------------------

def _numpy_reconstruct(subtype, shape, typecode):
    """``numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')``: the empty array that
    ``BUILD`` fills; any other form is refused."""
    _check(subtype is _NdarrayType and shape == (0, ) and typecode in (b'b', 'b'),
           'numpy _reconstruct other than of a plain ndarray')
    return _ArrayRecord()


def _numpy_dtype(code, align=False, copy=True):
    """``numpy.dtype(code, align, copy)``, then filled by ``BUILD`` (byte order)."""
    return _DtypeRecord(code, align, copy)


def _numpy_scalar(dtype, data=None):
    _check(isinstance(dtype, _DtypeRecord), 'numpy scalar of a dtype other than a plain one')
    _check(isinstance(data, bytes) and len(data) == dtype.dtype.itemsize,
           f'numpy scalar data must be {dtype.dtype.itemsize} bytes')
    return np.frombuffer(data, dtype=dtype.dtype)[0]


def _history_buffer_statistic(owner, name):
    """``getattr(HistoryBuffer, 'min')`` etc.: how a pickled ``HistoryBuffer`` names its
    statistics methods. Anything else ``getattr`` could reach is refused."""
    _check(owner is _HistoryBufferRecord and name in _HISTORY_BUFFER_STATISTICS,
           f'getattr({getattr(owner, "what", _type_name(owner))}, {name!r}): only '
           f'HistoryBuffer statistics methods {_HISTORY_BUFFER_STATISTICS}')
    return _StatisticRef(name)


def _codecs_encode(text, encoding='utf-8'):
    _check(isinstance(text, str) and encoding in ('latin1', 'latin-1'),
           '_codecs.encode other than (str, "latin1") (how protocol 2 stores bytes)')
    return text.encode('latin1')


def _bytearray(data=b'', encoding=None):
    if isinstance(data, str) and encoding in ('latin1', 'latin-1'):
        return bytearray(data.encode('latin1'))
    _check(isinstance(data, bytes) and encoding is None,
           'bytearray(...) other than of bytes (a size would allocate it)')
    return bytearray(data)


def _plain_set(items=()):
    _check(isinstance(items, (list, tuple)), f'set of a {_type_name(items)}')
    return set(items)


def _plain_frozenset(items=()):
    return frozenset(_plain_set(items))


def _plain_complex(real=0.0, imag=0.0):
    _check(all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (real, imag)),
           'complex(...) of non-numbers')
    return complex(real, imag)


def _ordered_dict(items=()):
    _check(isinstance(items, (list, tuple)) and all(
        isinstance(item, tuple) and len(item) == 2 for item in items),
        'OrderedDict(...) other than of (key, value) pairs')
    return OrderedDict(items)


def _counter(items=None):
    _check(items is None or isinstance(items, dict), 'Counter(...) other than of a dict')
    return Counter(items or {})


def _torch_size(dims=()):
    _check(isinstance(dims, (list, tuple)) and len(dims) <= _MAX_NDIM
           and all(_is_int(n) and n >= 0 for n in dims), f'torch.Size({dims!r})')
    return torch.Size(dims)


def _torch_device(kind, index=None):
    _check(isinstance(kind, str) and len(kind) < 64 and (index is None or _is_int(index)),
           f'torch.device({kind!r}, {index!r})')
    try:
        return torch.device(kind) if index is None else torch.device(kind, index)
    except (RuntimeError, ValueError) as error:
        raise _Refusal(f'torch.device({kind!r}): {error}') from None


def _get_layout(name):
    _check(name in ('torch.strided', 'torch.sparse_coo'), f'tensor layout {name!r}')
    return torch.serialization._get_layout(name)


def _storage_elements(storage) -> int:
    if isinstance(storage, torch.storage.TypedStorage):
        return storage._size()
    if isinstance(storage, torch.UntypedStorage):
        return storage.nbytes()
    raise _Refusal(f'a tensor on a {_type_name(storage)} instead of a storage from the file')


def _check_view(storage, offset, size, stride) -> None:
    elements = _storage_elements(storage)
    _check(_is_int(offset) and offset >= 0, f'tensor storage offset {offset!r}')
    _check(isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
           and len(size) <= _MAX_NDIM and all(_is_int(n) and n >= 0 for n in size + stride),
           f'tensor size {size!r} / stride {stride!r}')
    numel = math.prod(size)
    if numel:
        extent = offset + 1 + sum((n - 1) * s for n, s in zip(size, stride))
        _check(extent <= elements, f'a tensor view of {extent} elements on a storage of '
               f'{elements}')
    _check(numel <= max(elements, MAX_BROADCAST_ELEMENTS),
           f'a tensor of {numel} elements over a storage of {elements} (zero strides): at most '
           f'{MAX_BROADCAST_ELEMENTS} elements beyond the stored data')


def _check_no_hooks(requires_grad, backward_hooks) -> None:
    _check(isinstance(requires_grad, bool), 'tensor requires_grad is not a bool')
    _check(isinstance(backward_hooks, dict) and not backward_hooks,
           'tensor with backward hooks')


def _rebuild_tensor(storage, storage_offset, size, stride):
    _check_view(storage, storage_offset, size, stride)
    return torch._utils._rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       metadata=None):
    _check_view(storage, storage_offset, size, stride)
    _check_no_hooks(requires_grad, backward_hooks)
    _check(metadata is None or (isinstance(metadata, dict) and all(
        isinstance(k, str) and isinstance(v, bool) for k, v in metadata.items())),
        'tensor metadata other than flags')
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
                                           OrderedDict(), metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
    _check(isinstance(dtype, torch.dtype), 'tensor dtype is not a torch dtype')
    _check_view(storage, storage_offset, size, stride)
    _check_no_hooks(requires_grad, backward_hooks)
    _check(metadata is None or (isinstance(metadata, dict) and all(
        isinstance(k, str) and isinstance(v, bool) for k, v in metadata.items())),
        'tensor metadata other than flags')
    return torch._utils._rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad,
                                           OrderedDict(), dtype, metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    _check(type(data) is torch.Tensor, 'a parameter of something other than a tensor')
    _check_no_hooks(requires_grad, backward_hooks)
    return torch.nn.Parameter(data, requires_grad)


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    _check(not state, 'a parameter with attributes')
    return _rebuild_parameter(data, requires_grad, backward_hooks)


_TENSOR_REBUILDS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter,
                    _rebuild_parameter_with_state)


def _rebuild_from_type_v2(func, new_type, args, state):
    _check(func in _TENSOR_REBUILDS and new_type in (torch.Tensor, torch.nn.Parameter)
           and isinstance(args, tuple) and not state,
           'a tensor subclass or a tensor with attributes')
    result = func(*args)
    if type(result) is not new_type:
        result = result.as_subclass(new_type)
    return result


def _build_checkpoint_globals() -> Dict[str, Any]:
    table: Dict[str, Any] = {
        'torch._utils._rebuild_tensor': _rebuild_tensor,
        'torch._utils._rebuild_tensor_v2': _rebuild_tensor_v2,
        'torch._utils._rebuild_tensor_v3': _rebuild_tensor_v3,
        'torch._utils._rebuild_parameter': _rebuild_parameter,
        'torch._utils._rebuild_parameter_with_state': _rebuild_parameter_with_state,
        'torch._tensor._rebuild_from_type_v2': _rebuild_from_type_v2,
        'torch.serialization._get_layout': _get_layout,
        'torch.Size': _torch_size,
        'torch.device': _torch_device,
        'torch.Tensor': torch.Tensor,  # only as _rebuild_from_type_v2's type
        'torch.nn.parameter.Parameter': torch.nn.Parameter,
        'collections.OrderedDict': _ordered_dict,
        'collections.Counter': _counter,
        'builtins.set': _plain_set,
        'builtins.frozenset': _plain_frozenset,
        'builtins.complex': _plain_complex,
        'builtins.bytearray': _bytearray,
        '_codecs.encode': _codecs_encode,
        'numpy.ndarray': _NdarrayType,
        'numpy.dtype': _numpy_dtype,
        'builtins.getattr': _history_buffer_statistic,
        'mmengine.logging.history_buffer.HistoryBuffer': _HistoryBufferRecord,
        'argparse.Namespace': _NamespaceRecord,
    }
    for module in _NUMPY_MULTIARRAY:
        table[f'{module}._reconstruct'] = _numpy_reconstruct
        table[f'{module}.scalar'] = _numpy_scalar
    for value in vars(torch).values():
        if isinstance(value, torch.dtype):
            table[str(value)] = value
    return table


#: Every global a checkpoint may name, and what it stands for: a checked reconstructor
#: (called by REDUCE), a record class (NEWOBJ, then filled by BUILD), or a constant.
CHECKPOINT_GLOBALS: Dict[str, Any] = _build_checkpoint_globals()
_CONSTANT_TYPES = (torch.dtype, type)
# Called with NEWOBJ (cls.__new__ + BUILD in pickle's protocol 2).
_NEWOBJ_RECORDS = (_HistoryBufferRecord, _NamespaceRecord)


def _global_name(value) -> str:
    """The checkpoint name a table entry stands for (for messages)."""
    for name, entry in CHECKPOINT_GLOBALS.items():
        if entry is value:
            return name
    return getattr(value, '__name__', _type_name(value))


def mmengine_checkpoint_globals() -> List[str]:
    """The names of the globals a checkpoint may use (the keys of :data:`CHECKPOINT_GLOBALS`)."""
    return sorted(CHECKPOINT_GLOBALS)


# --- the unpickler -------------------------------------------------------------------------

class RestrictedUnpickler(pickle._Unpickler):
    """pickle's Python unpickler where every global comes from :data:`CHECKPOINT_GLOBALS` and
    the opcodes that call code (REDUCE, NEWOBJ, BUILD, ...) only reach its reconstructors.

    ``budget`` is a one-item list shared by one ``torch.load``: the storage bytes the file may
    still declare (its size); ``persistent_load`` (set by torch) sees only storage ids.
    """
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, *, budget: Optional[List[int]] = None, **kwargs) -> None:
        super().__init__(file, **kwargs)
        self._budget = budget if budget is not None else [float('inf')]
        self._storage_keys = set()

    def load(self):
        try:
            return super().load()
        except (_Refusal, CorruptCheckpointError):
            raise
        except (EOFError, KeyError, IndexError, TypeError, ValueError, AttributeError,
                struct.error, UnicodeDecodeError, pickle.UnpicklingError) as error:
            raise CorruptCheckpointError(
                f'malformed pickle data ({type(error).__name__}: {str(error)[:200]})') from None

    def find_class(self, module, name):
        if self.proto < 3 and self.fix_imports:  # Python 2 names, as pickle's own find_class
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        full_name = f'{module}.{name}'
        if full_name not in CHECKPOINT_GLOBALS:
            raise _Refusal(f'it needs the global {full_name}')
        return CHECKPOINT_GLOBALS[full_name]

    def _refuse_opcode(self):
        raise _Refusal('pickle opcodes that import or call by other means (INST, OBJ, EXT, '
                       'PERSID) are not allowed')

    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if isinstance(func, _CONSTANT_TYPES) or not callable(func) or func in _NEWOBJ_RECORDS:
            raise _Refusal(f'calling {_global_name(func)} is not allowed')
        _check(isinstance(args, tuple), 'REDUCE arguments are not a tuple')
        self.stack[-1] = func(*args)

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        _check(cls in _NEWOBJ_RECORDS and isinstance(args, tuple),
               f'creating an object of {_global_name(cls)} is not allowed')
        self.append(cls(*args))

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        _check(kwargs == {}, 'NEWOBJ_EX with keyword arguments')
        self.load_newobj()

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, _Record):
            inst.build(state)
        elif type(inst) is OrderedDict:  # nn.Module state dicts keep `_metadata` this way
            _check(isinstance(state, dict) and all(
                isinstance(k, str) and not k.startswith('__') for k in state),
                'OrderedDict attributes other than plain names')
            inst.__dict__.update(state)
        else:
            raise _Refusal(f'BUILD (setting state) of a {_type_name(inst)} is not allowed')

    def load_append(self):
        _check(type(self.stack[-2]) is list, 'APPEND to something other than a list')
        super().load_append()

    def load_appends(self):
        items = self.pop_mark()
        _check(type(self.stack[-1]) is list, 'APPENDS to something other than a list')
        self.stack[-1].extend(items)

    def load_setitem(self):
        _check(type(self.stack[-3]) in (dict, OrderedDict, Counter),
               'SETITEM on something other than a dict')
        super().load_setitem()

    def load_setitems(self):
        items = self.pop_mark()
        target = self.stack[-1]
        _check(type(target) in (dict, OrderedDict, Counter),
               'SETITEMS on something other than a dict')
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def load_additems(self):
        items = self.pop_mark()
        _check(type(self.stack[-1]) is set, 'ADDITEMS on something other than a set')
        self.stack[-1].update(items)

    def load_binpersid(self):
        pid = self.stack.pop()
        _check(isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ('storage', b'storage'),
               'a persistent id other than a tensor storage')
        storage_type, key, numel = pid[1], pid[2], pid[4]
        _check(isinstance(key, (str, bytes)) and _is_int(numel) and numel >= 0,
               'a malformed tensor storage id')
        dtype = getattr(storage_type, 'dtype', torch.uint8)
        _check(isinstance(dtype, torch.dtype), 'a storage of an unknown type')
        if key not in self._storage_keys:
            self._storage_keys.add(key)
            nbytes = numel * torch._utils._element_size(dtype)
            _check(nbytes <= self._budget[0], f'its tensor storages declare more bytes '
                   f'({nbytes} for storage {key!r}) than the file holds')
            self._budget[0] -= nbytes
        self.append(self.persistent_load(pid))

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.APPEND[0]] = load_append
    dispatch[pickle.APPENDS[0]] = load_appends
    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.ADDITEMS[0]] = load_additems
    dispatch[pickle.BINPERSID[0]] = load_binpersid
    for _opcode in (pickle.INST, pickle.OBJ, pickle.EXT1, pickle.EXT2, pickle.EXT4,
                    pickle.PERSID):
        dispatch[_opcode[0]] = _refuse_opcode
    del _opcode


def _pickle_module(budget: List[int]):
    """A ``pickle_module`` for ``torch.load`` whose unpickling is :class:`RestrictedUnpickler`."""
    unpickler = functools.partial(RestrictedUnpickler, budget=budget)

    class Unpickler(RestrictedUnpickler):
        def __init__(self, file, **kwargs):
            super().__init__(file, budget=budget, **kwargs)

    def load(file, **kwargs):
        return unpickler(file, **kwargs).load()

    return types.SimpleNamespace(__name__='mmdet_detrx_restricted_pickle', Unpickler=Unpickler,
                                 load=load, UnpicklingError=pickle.UnpicklingError)


# --- the structural pass --------------------------------------------------------------------

_LEAF_TYPES = (type(None), bool, int, float, complex, str, bytes, bytearray, torch.dtype,
               torch.device, torch.Size, torch.layout, np.generic, np.ndarray, np.dtype,
               torch.storage.TypedStorage, torch.UntypedStorage)
_HASHABLE_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, np.generic)


def _children(obj) -> List[Any]:
    if isinstance(obj, _Record):
        return obj.fields()
    if isinstance(obj, dict):
        for key in obj:
            _check(isinstance(key, _HASHABLE_LEAVES) or (isinstance(key, tuple) and all(
                isinstance(k, _HASHABLE_LEAVES) for k in key)),
                f'a dict key of type {_type_name(key)}')
        extra = list(vars(obj).values()) if type(obj) is OrderedDict else []
        return list(obj.values()) + extra
    if isinstance(obj, (set, frozenset)):
        for item in obj:
            _check(isinstance(item, _HASHABLE_LEAVES), f'a set member of type {_type_name(item)}')
        return []
    if isinstance(obj, (list, tuple)):
        return list(obj)
    return []


def _leaf(obj):
    if isinstance(obj, torch.Tensor):
        _check(type(obj) in (torch.Tensor, torch.nn.Parameter) and not vars(obj),
               f'a tensor of type {_type_name(obj)} or with attributes')
        return obj
    _check(isinstance(obj, _LEAF_TYPES) and not isinstance(obj, type),
           f'an object of type {_type_name(obj)} in the result')
    return obj


def _finalize(root):
    """Resolve records into objects and bound the structure (depth, expanded size, cycles).

    Iterative post-order walk with a memo by id: linear in the distinct objects, whatever the
    sharing; shared objects stay shared (one resolved object per record/tuple).
    """
    done: Dict[int, tuple] = {}  # id -> (result, expanded size, depth)
    keep_alive = []
    on_path = set()
    stack = [(root, False, 1)]
    while stack:
        obj, expanded, level = stack.pop()
        key = id(obj)
        if not expanded:
            if key in done:
                continue
            _check(key not in on_path, 'a reference cycle in the data')
            is_container = isinstance(obj, (_Record, dict, list, tuple, set, frozenset)) and \
                not isinstance(obj, torch.Size)
            if not is_container:
                done[key] = (_leaf(obj), 1, 1)
                keep_alive.append(obj)
                continue
            _check(level <= MAX_NESTING_DEPTH,
                   f'nesting deeper than {MAX_NESTING_DEPTH} levels')
            children = _children(obj)
            on_path.add(key)
            stack.append((obj, True, level))
            for child in children:
                if id(child) in on_path:
                    raise _Refusal('a reference cycle in the data')
                if id(child) not in done:
                    stack.append((child, False, level + 1))
            continue
        on_path.discard(key)
        children = _children(obj)
        results = [done[id(child)] for child in children]
        size = 1 + sum(r[1] for r in results)
        _check(size <= MAX_EXPANDED_NODES,
               f'more than {MAX_EXPANDED_NODES} objects counting shared ones per reference '
               '(exponential sharing)')
        depth = 1 + max((r[2] for r in results), default=0)
        _check(depth <= MAX_NESTING_DEPTH, f'nesting deeper than {MAX_NESTING_DEPTH} levels')
        values = [r[0] for r in results]
        if isinstance(obj, _Record):
            result = obj.resolve(values)
        elif isinstance(obj, dict):
            items = list(obj.items())
            for (name, old), new in zip(items, values):
                if new is not old:
                    obj[name] = new
            if type(obj) is OrderedDict:
                attrs = vars(obj)
                for name, new in zip(list(attrs), values[len(items):]):
                    attrs[name] = new
            result = obj
        elif isinstance(obj, list):
            for i, (old, new) in enumerate(zip(obj, values)):
                if new is not old:
                    obj[i] = new
            result = obj
        elif isinstance(obj, tuple):
            result = obj if all(n is o for n, o in zip(values, obj)) else tuple(values)
        else:
            result = obj
        done[key] = (result, size, depth)
        keep_alive.append(obj)
    return done[id(root)][0]


# --- loading --------------------------------------------------------------------------------

def _refused(source: str, what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f'refused to load checkpoint {source}: {what}. The safe loader rebuilds only tensors, '
        'containers, numbers, strings and mmengine\'s checkpoint types, within bounds; anything '
        'else could run code from the file or exhaust the machine. If you trust the file (e.g. '
        f'a legacy checkpoint you wrote yourself), load it with {TRUSTED_CHECKPOINTS_ENV}=1 in '
        'the environment or --trust-checkpoint on tools/train.py and tools/test.py.')


def _file_size(f) -> int:
    if isinstance(f, (str, os.PathLike)):
        return osp.getsize(f)
    position = f.tell()
    f.seek(0, io.SEEK_END)
    size = f.tell() - position
    f.seek(position)
    return size


def _is_tar(f) -> bool:
    if isinstance(f, (str, os.PathLike)):
        return tarfile.is_tarfile(f)
    position = f.tell()
    try:
        return tarfile.is_tarfile(f)
    finally:
        f.seek(position)


def restricted_load(f, map_location=None, *, source: Optional[str] = None, mmap=None):
    """``torch.load`` through :class:`RestrictedUnpickler`, then :func:`_finalize`.

    Args:
        f: a path or a seekable binary file object.
        map_location: as ``torch.load``.
        source (str, optional): the name used in errors (default: the path).
        mmap (bool, optional): as ``torch.load`` (zip format and a path only).

    Raises:
        UnsafeCheckpointError: the file needs something outside the allow-list or its bounds.
        CorruptCheckpointError: malformed pickle data (truncated, inconsistent).
    """
    source = source or (os.fspath(f) if isinstance(f, (str, os.PathLike)) else repr(f))
    if _is_tar(f):
        raise _refused(source, 'it is in the tar format of torch < 0.4')
    budget = [_file_size(f) + _STORAGE_SLACK_BYTES]
    try:
        loaded = torch.load(f, map_location=map_location, pickle_module=_pickle_module(budget),
                            weights_only=False, mmap=mmap)
        return _finalize(loaded)
    except _Refusal as refusal:
        raise _refused(source, str(refusal)) from None
    except CorruptCheckpointError as error:
        raise CorruptCheckpointError(f'cannot load checkpoint {source}: {error}') from None


def load_checkpoint_file(filename: str, map_location=None, mmap=None):
    """Load a local checkpoint safely (:func:`restricted_load`), or fully when the user opted in
    to trust it (:func:`trusted_checkpoints`)."""
    filename = osp.expanduser(os.fspath(filename))
    if not osp.isfile(filename):
        raise FileNotFoundError(f'checkpoint not found: {filename}')
    if trusted_checkpoints():
        print_log(f'{TRUSTED_CHECKPOINTS_ENV}=1: loading {filename} as a full pickle '
                  '(weights_only=False); only do this for files you trust', logger='current',
                  level=logging.WARNING)
        return torch.load(filename, map_location=map_location, weights_only=False, mmap=mmap)
    return restricted_load(filename, map_location, mmap=mmap)


def safe_torch_load(file, map_location=None, weights_only=None):
    """Drop-in for OneDL mmengine's ``mmengine.runner.checkpoint._safe_torch_load`` (whose own
    fallback on a refused file is ``weights_only=False``): a path or a file object, loaded with
    :func:`restricted_load` unless the user opted in to trust checkpoints. ``weights_only`` is
    accepted for the signature; it cannot make loading less safe."""
    if trusted_checkpoints():
        return torch.load(file, map_location=map_location, weights_only=False)
    return restricted_load(file, map_location)


def load_from_local_safe(filename, map_location=None):
    return load_checkpoint_file(filename, map_location)


def load_from_http_safe(filename, map_location=None, model_dir=None, progress=os.isatty(0)):
    """mmengine's ``load_from_http`` (rank 0 downloads first) with torch.hub's cache layout,
    loading the cached file with :func:`load_checkpoint_file`."""
    from urllib.parse import urlparse

    from mmengine.dist import get_dist_info
    rank, world_size = get_dist_info()
    if model_dir is None:
        model_dir = osp.join(torch.hub.get_dir(), 'checkpoints')
    cached_file = osp.join(model_dir, osp.basename(urlparse(filename).path))

    def load():
        os.makedirs(model_dir, exist_ok=True)
        if not osp.exists(cached_file):
            torch.hub.download_url_to_file(filename, cached_file, None, progress=progress)
        if zipfile.is_zipfile(cached_file):
            with zipfile.ZipFile(cached_file) as archive:
                members = archive.infolist()
            if len(members) == 1 and not members[0].is_dir():  # torch.hub's legacy zip format
                raise _refused(filename, 'it is a zip of one legacy checkpoint (torch < 1.6)')
        return load_checkpoint_file(cached_file, map_location)

    checkpoint = load() if rank == 0 else None
    if world_size > 1:
        torch.distributed.barrier()
        if rank > 0:
            checkpoint = load()
    return checkpoint


# --- configs inside checkpoints -------------------------------------------------------------

def _literal_gpu_ids(text: str) -> Optional[list]:
    """``gpu_ids`` of a config text, read without executing it (``ast`` + literal_eval)."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == 'gpu_ids' for t in node.targets):
            try:
                value = ast.literal_eval(node.value)
            except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
                return None
            if isinstance(value, (list, tuple, range)) and all(_is_int(i) for i in value):
                return list(value)
            return None
    return None


def inert_checkpoint_config(checkpoint) -> None:
    """Make ``checkpoint['meta']['config']`` safe for ``Runner.resume`` in place.

    mmengine's ``Runner.resume`` (and ``FlexibleRunner``'s) runs ``Config.fromstring`` on that
    text, which executes it, only to read ``gpu_ids`` for a GPU-count check. The text is parsed
    (never executed) and replaced by ``gpu_ids = [...]`` when it has a literal one, else removed.
    """
    meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
    if not isinstance(meta, dict) or 'config' not in meta:
        return
    text = meta['config']
    gpu_ids = _literal_gpu_ids(text) if isinstance(text, str) else None
    if gpu_ids is None:
        del meta['config']
        print_log("the checkpoint's meta['config'] is ignored on resume (mmengine would execute "
                  'it as Python)', logger='current', level=logging.WARNING)
    else:
        meta['config'] = f'gpu_ids = {gpu_ids!r}\n'


def _wrap_resume(resume: Callable) -> Callable:
    if getattr(resume, '_detrx_inert_config', False):
        return resume

    @functools.wraps(resume)
    def resume_without_config_code(self, *args, **kwargs):
        # Both runners pass the loaded checkpoint to call_hook('after_load_checkpoint') before
        # reading meta['config']: neutralise it there, for this call only.
        call_hook = self.call_hook

        def call_hook_inert(fn_name, **hook_kwargs):
            if fn_name == 'after_load_checkpoint' and 'checkpoint' in hook_kwargs:
                inert_checkpoint_config(hook_kwargs['checkpoint'])
            return call_hook(fn_name, **hook_kwargs)

        self.call_hook = call_hook_inert
        try:
            return resume(self, *args, **kwargs)
        finally:
            del self.call_hook

    resume_without_config_code._detrx_inert_config = True
    return resume_without_config_code


def patch_runner_resume() -> None:
    """Make ``Runner.resume`` and ``FlexibleRunner.resume`` ignore executable config text."""
    from mmengine.runner import Runner
    Runner.resume = _wrap_resume(Runner.resume)
    try:
        from mmengine.runner import FlexibleRunner
    except ImportError:
        return
    FlexibleRunner.resume = _wrap_resume(FlexibleRunner.resume)


def _config_from_checkpoint(weights: str) -> dict:
    """The config a Runner stored in checkpoint ``weights``, read as data (never executed)."""
    from mmengine.runner.checkpoint import _load_checkpoint
    from .literal_config import ConfigNotLiteralError, literal_config
    checkpoint = _load_checkpoint(weights, map_location='cpu')

    def entry(mapping, *keys):  # checkpoint[k0][k1]... or None
        for key in keys:
            mapping = mapping.get(key) if isinstance(mapping, dict) else None
        return mapping

    # Where BaseInferencer looks, in its order: message_hub's runtime info, then meta.
    text = entry(checkpoint, 'message_hub', 'runtime_info', 'cfg')
    if text is None:
        text = entry(checkpoint, 'meta', 'cfg')
    if text is None:
        raise ValueError(f'{weights} holds no config (meta["cfg"] or message_hub): pass the '
                         'config file too, e.g. DetInferencer(model=CONFIG, weights=CHECKPOINT)')
    try:
        return literal_config(text)
    except ConfigNotLiteralError as error:
        raise _refused(weights, f'its stored config is not plain data ({error}); mmengine would '
                       'execute it as Python. Pass the config file instead: '
                       'DetInferencer(model=CONFIG, weights=CHECKPOINT)') from None


def _wrap_init_model(init_model: Callable) -> Callable:
    if getattr(init_model, '_detrx_literal_config', False):
        return init_model

    @functools.wraps(init_model)
    def init_model_from_literal_config(self, cfg, weights, device):
        # BaseInferencer(model=None, weights=ckpt) builds the model from the checkpoint's config
        # text with Config.fromstring, which runs it: read it as data instead.
        if not cfg and weights is not None and not trusted_checkpoints():
            # In place, as mmengine does: BaseInferencer.__init__ keeps using this object.
            cfg.update(_config_from_checkpoint(weights))
        return init_model(self, cfg, weights, device)

    init_model_from_literal_config._detrx_literal_config = True
    return init_model_from_literal_config


def patch_inferencer_config() -> None:
    """Make mmengine's ``BaseInferencer`` read a checkpoint's stored config as data."""
    from mmengine.infer import BaseInferencer
    BaseInferencer._init_model = _wrap_init_model(BaseInferencer._init_model)


def patch_mmengine_checkpoint_loading() -> None:
    """Register the safe local and http(s) loaders in mmengine's ``CheckpointLoader``, route
    OneDL mmengine's ``_safe_torch_load`` through :func:`safe_torch_load`, make
    ``Runner.resume`` ignore executable config text, and make ``BaseInferencer`` (mmdet's
    ``DetInferencer(weights=ckpt)``) read a checkpoint's config as data (once)."""
    global _PATCHED
    if _PATCHED:
        return
    CheckpointLoader.register_scheme(prefixes='', force=True)(load_from_local_safe)
    CheckpointLoader.register_scheme(prefixes=('http://', 'https://'),
                                     force=True)(load_from_http_safe)
    from mmengine.runner import checkpoint as mmengine_checkpoint
    if hasattr(mmengine_checkpoint, '_safe_torch_load'):  # OneDL mmengine
        mmengine_checkpoint._safe_torch_load = safe_torch_load
    patch_runner_resume()
    patch_inferencer_config()
    _PATCHED = True
