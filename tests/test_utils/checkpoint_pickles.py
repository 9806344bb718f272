"""Raw protocol-2 pickle pieces for crafting checkpoints the way an attacker would.

Every helper returns bytes that push one value; :func:`legacy_checkpoint` wraps a finished
pickle (ending in ``STOP``) in torch's legacy (non-zip) container so ``torch.load`` reads it.
"""
import pickle
import struct

PROTO = b'\x80\x02'
REDUCE = b'R'
BUILD = b'b'
STOP = b'.'
TUPLE1 = b'\x85'
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_SYS_INFO = {'protocol_version': 1001, 'little_endian': True,
             'type_sizes': {'short': 2, 'int': 4, 'long': 4}}


def GLOBAL(module, name):  # noqa: N802  (the opcode's name)
    return b'c' + module.encode() + b'\n' + name.encode() + b'\n'


HISTORY_BUFFER = GLOBAL('mmengine.logging.history_buffer', 'HistoryBuffer')


def string(text):
    data = text.encode()
    return b'X' + struct.pack('<I', len(data)) + data


def integer(value):
    if -2**31 <= value < 2**31:
        return b'J' + struct.pack('<i', value)
    data = value.to_bytes((value.bit_length() + 8) // 8, 'little', signed=True)
    return b'\x8a' + bytes([len(data)]) + data


def float64_array(values):
    """``numpy.array(values, float64)`` as numpy pickles it (``_reconstruct`` + ``BUILD``)."""
    data = struct.pack(f'<{len(values)}d', *values)
    return (GLOBAL('numpy._core.multiarray', '_reconstruct') + GLOBAL('numpy', 'ndarray') +
            integer(0) + TUPLE1 + b'C\x01b' + b'\x87' + REDUCE + b'(' + integer(1) +
            integer(len(values)) + TUPLE1 + GLOBAL('numpy', 'dtype') + string('f8') +
            b'\x89\x88\x87' + REDUCE + b'(' + integer(3) + string('<') + b'NNN' + integer(-1) +
            integer(-1) + integer(0) + b't' + BUILD + b'\x89' + b'C' + bytes([len(data)]) + data +
            b't' + BUILD)


def history_buffer_pickle(statistics=None, extra=None):
    """A whole pickle of one ``HistoryBuffer([1, 3], [1, 1])``; ``statistics`` maps names to
    the method ``getattr(HistoryBuffer, method)`` (default: each to itself); ``extra`` adds
    raw state entries."""
    statistics = statistics or {name: name for name in ('min', 'max', 'current', 'mean')}
    methods = b'}('
    for name, method in statistics.items():
        methods += string(name) + GLOBAL('builtins', 'getattr') + HISTORY_BUFFER + \
            string(method) + b'\x86' + REDUCE
    methods += b'u'
    state = (b'}(' + string('max_length') + integer(1000000) + string('_log_history') +
             float64_array([1.0, 3.0]) + string('_count_history') + float64_array([1.0, 1.0]) +
             string('statistics_methods') + methods)
    for key, value in (extra or {}).items():
        state += string(key) + value
    return PROTO + HISTORY_BUFFER + b')\x81' + state + b'u' + BUILD + STOP


def legacy_checkpoint(path, pickle_bytes):
    """Write ``pickle_bytes`` as the object of a legacy-format torch checkpoint at ``path``."""
    with open(path, 'wb') as f:
        for header in (_LEGACY_MAGIC, 1001, _SYS_INFO):
            pickle.dump(header, f, protocol=2)
        f.write(pickle_bytes)
        pickle.dump([], f, protocol=2)  # no storages
    return str(path)
