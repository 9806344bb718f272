"""Fuzz the safe checkpoint loader with random pickles built from the allow-listed globals.

Each case is a random protocol-2 pickle: values, containers, memo references and the risky
opcodes (REDUCE, NEWOBJ, BUILD) applied to globals drawn from ``CHECKPOINT_GLOBALS`` (plus a few
forbidden ones), mixed with well-formed templates of what checkpoints really contain (numpy
arrays and dtypes, ``HistoryBuffer``) with random fields. Every case is loaded in a forked child
process under an address-space limit and a timeout, and must either return plain data or be
refused with an ``UnsafeCheckpointError`` / ``CorruptCheckpointError`` naming the file; it must
never run code (a marker file), change ``HistoryBuffer``'s class state, raise anything else,
hang or exhaust memory. The default run has 30 examples; ``--runslow`` adds 400 more.
"""
import argparse
import os
import resource
import signal
import struct
import time
from collections import Counter, OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mmengine.logging import HistoryBuffer

import mmdet_detrx  # noqa: F401
from mmdet_detrx.utils.safe_checkpoint import (CHECKPOINT_GLOBALS, CorruptCheckpointError,
                                               UnsafeCheckpointError, restricted_load)

from checkpoint_pickles import (BUILD, GLOBAL, PROTO, REDUCE, STOP, float64_array,
                                history_buffer_pickle, integer, legacy_checkpoint, string)

_MARKER = '/tmp/detrx-fuzz-marker-{pid}'
_TIMEOUT_S = 30
_EXTRA_MEMORY = 1 << 30  # the child may grow by at most 1 GiB of address space
_FORBIDDEN = ['posix.system', 'builtins.eval', 'builtins.exec', 'os.system',
              'subprocess.Popen', 'builtins.__import__', 'numpy.frombuffer',
              'torch._utils._rebuild_meta_tensor_no_storage', 'torch.FloatTensor']

_names = sorted(CHECKPOINT_GLOBALS) + _FORBIDDEN


def _global(name):
    module, _, attr = name.rpartition('.')
    return GLOBAL(module, attr)


_atoms = st.one_of(
    st.integers(-2**70, 2**70).map(integer),
    st.text(max_size=12).map(string),
    st.floats(allow_nan=True).map(lambda x: b'G' + struct.pack('>d', x)),
    st.binary(max_size=24).map(lambda b: b'C' + bytes([len(b)]) + b),
    st.sampled_from([b'N', b'\x88', b'\x89', b')', b']', b'}']),
    st.sampled_from(_names).map(_global),
    st.integers(0, 7).map(lambda i: b'h' + bytes([i])),  # memo reference (may be missing)
    st.sampled_from(['f8', 'i8', 'b1', 'u1', 'O', 'U3', 'V8', 'f2']).map(
        lambda code: GLOBAL('numpy', 'dtype') + string(code) + b'\x89\x88\x87' + REDUCE),
    st.lists(st.floats(-1e3, 1e3), max_size=5).map(float64_array),
    st.just(history_buffer_pickle()[len(PROTO):-1]),
    st.just(history_buffer_pickle(statistics={'mean': 'min'})[len(PROTO):-1]),
    st.just(GLOBAL('posix', 'system') + string(_MARKER.format(pid='x')) + b'\x85' + REDUCE),
)


def _compound(children):
    items = st.lists(children, max_size=4)
    return st.one_of(
        items.map(lambda xs: b'(' + b''.join(xs) + b't'),  # tuple
        items.map(lambda xs: b']' + b'(' + b''.join(xs) + b'e'),  # list
        items.map(lambda xs: b'}' + b'(' + b''.join(xs) + b'u'),  # dict
        st.tuples(children, children).map(lambda ab: ab[0] + ab[1] + REDUCE),
        st.tuples(children, children).map(lambda ab: ab[0] + ab[1] + b'\x81'),  # NEWOBJ
        st.tuples(children, children).map(lambda ab: ab[0] + ab[1] + BUILD),
        st.tuples(children, st.integers(0, 7)).map(lambda ab: ab[0] + b'q' + bytes([ab[1]])),
        st.tuples(children, st.integers(1, 3)).map(lambda ab: ab[0] + b'2' * ab[1]),  # DUP
    )


pickles = st.recursive(_atoms, _compound, max_leaves=24).map(lambda body: PROTO + body + STOP)

_PLAIN = (type(None), bool, int, float, complex, str, bytes, bytearray, np.generic, np.dtype,
          torch.dtype, torch.device, torch.Size)


def _plain(root) -> str:
    """'' if ``root`` is plain data, else what is not."""
    seen, stack = set(), [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, _PLAIN):
            continue
        if isinstance(obj, np.ndarray):
            if obj.dtype.kind not in 'biufc':
                return f'array of {obj.dtype}'
        elif type(obj) in (torch.Tensor, torch.nn.Parameter):
            if vars(obj):
                return 'tensor attributes'
        elif type(obj) is HistoryBuffer:
            if set(vars(obj)) != {'max_length', '_log_history', '_count_history'}:
                return f'HistoryBuffer fields {sorted(vars(obj))}'
            stack.extend(vars(obj).values())
        elif type(obj) is argparse.Namespace:
            stack.extend(vars(obj).values())
        elif type(obj) in (dict, OrderedDict, Counter):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif type(obj) in (list, tuple, set, frozenset):
            stack.extend(obj)
        else:
            return f'object of type {type(obj).__name__}'
    return ''


def _load_in_child(path: str) -> str:
    """Load ``path`` in a forked child under memory and time limits; return its verdict."""
    with open('/proc/self/status') as status:
        vm_kb = next(int(line.split()[1]) for line in status if line.startswith('VmSize:'))
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        verdict = 'no verdict'
        try:
            os.close(read_end)
            limit = vm_kb * 1024 + _EXTRA_MEMORY
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            signal.alarm(_TIMEOUT_S)
            torch.set_num_threads(1)
            HistoryBuffer()  # registers the default statistics, as any first buffer does
            statistics = dict(HistoryBuffer._statistics_methods)
            try:
                problem = _plain(restricted_load(path, map_location='cpu'))
                verdict = f'not plain data: {problem}' if problem else 'plain'
            except (UnsafeCheckpointError, CorruptCheckpointError) as error:
                verdict = 'refused' if path in str(error) else f'refused unnamed: {error}'
            except BaseException as error:  # noqa: B902  (MemoryError, alarm, anything)
                verdict = f'unexpected {type(error).__name__}: {str(error)[:300]}'
            if HistoryBuffer._statistics_methods != statistics:
                verdict = 'HistoryBuffer class statistics changed'
            os.write(write_end, verdict.encode()[:4000])
        finally:
            os._exit(0)
    os.close(write_end)
    deadline = time.monotonic() + _TIMEOUT_S + 10
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_end)
            return 'hang (killed)'
        time.sleep(0.01)
    with os.fdopen(read_end, 'rb') as pipe:
        return pipe.read().decode() or 'child died without a verdict'


def _check_case(tmp_path_factory, data: bytes) -> str:
    path = legacy_checkpoint(tmp_path_factory.mktemp('fuzz') / 'case.pth', data)
    verdict = _load_in_child(path)
    assert verdict in ('plain', 'refused'), (verdict, data)
    assert not os.path.exists(_MARKER.format(pid='x'))
    return verdict


_SETTINGS = dict(deadline=None, database=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture,
                                        HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=30, **_SETTINGS)
@given(data=pickles)
def test_random_pickles_load_plain_or_are_refused(tmp_path_factory, data):
    _check_case(tmp_path_factory, data)


@pytest.mark.slow
@settings(max_examples=400, **{**_SETTINGS, 'derandomize': False})
@given(data=pickles)
def test_random_pickles_load_plain_or_are_refused_long(tmp_path_factory, data):
    _check_case(tmp_path_factory, data)


def test_fuzz_harness_sees_plain_loads_and_refusals(tmp_path_factory):
    """The harness itself: a well-formed HistoryBuffer loads, a forbidden global is refused."""
    assert _check_case(tmp_path_factory, history_buffer_pickle()) == 'plain'
    assert _check_case(tmp_path_factory, PROTO + _global('posix.system') + string('true') +
                       b'\x85' + REDUCE + STOP) == 'refused'
