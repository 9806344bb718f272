"""Pieces every analysis tool shares: timing, machine description, tables, charts, panels, flags.

Tools in this folder run as scripts (``python tools/analysis/X.py``), so ``from _common import
...`` resolves to this file; tests import the tools by path with this folder on ``sys.path``.

* :func:`time_call` / :func:`time_calls`: wall (or process CPU) time of callables with warm-up,
  device synchronisation and repeats; ``time_calls`` interleaves several callables run by run,
  so slow drift of a shared machine's load hits them alike.
* :func:`describe_machine` / :func:`machine_line`: the CPU (model, cores, vector ISA), threads,
  torch version and GPU, for the header of every table.
* :class:`Column`, :func:`markdown_table`, :func:`write_csv`: one row list, two formats.
* :func:`bar_chart`: grouped bars on a **linear** axis with each bar's ratio to a baseline
  series written on it (a log axis makes a 3x look like 20x).
* :func:`panel_grid` / :func:`panel_shape`: rows x columns of a figure of panels, and a panel's
  pixel size for an image.
* :func:`removing`: a context that removes a recorder's forward hooks on leaving, whatever
  happens inside (``with removing(Recorder(model)) as recorder: inference_detector(...)``).
* :func:`add_common_args`: the flags tools share, under one name each (old spellings kept as
  aliases).
"""
import argparse
import contextlib
import csv
import math
import os
import os.path as osp
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    'Timing', 'CLOCKS', 'DTYPES', 'sync_device', 'time_call', 'time_calls', 'describe_machine',
    'machine_line', 'Column', 'markdown_table', 'write_csv', 'bar_chart', 'panel_grid',
    'panel_shape', 'removing', 'add_common_args', 'parse_hw'
]

CLOCKS = {'wall': time.perf_counter, 'cpu': time.process_time}
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16,
          'float64': torch.float64}


# --------------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Seconds of each timed run (warm-up excluded), and the last run's return value."""
    times: List[float] = field(default_factory=list)
    output: Any = None

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def median_ms(self) -> float:
        return 1e3 * self.median


def sync_device(device: Union[str, torch.device, None]) -> None:
    """Wait for queued kernels of ``device`` (CUDA); no-op on CPU."""
    device = torch.device(device or 'cpu')
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1,
              device='cpu', clock: str = 'wall', setup: Optional[Callable] = None,
              teardown: Optional[Callable] = None) -> Timing:
    """Time ``fn()``: ``warmup`` untimed runs, then ``repeats`` timed ones.

    ``setup()``/``teardown(output)`` run around every timed call, outside the clock (e.g. to reset
    a memory high-water mark and read it).
    """
    return time_calls({'fn': fn}, repeats=repeats, warmup=warmup, device=device, clock=clock,
                      setup=(lambda _: setup()) if setup else None,
                      teardown=(lambda _, out: teardown(out)) if teardown else None)['fn']


def time_calls(fns: Mapping[str, Callable[[], Any]], *, repeats: int = 3, warmup: int = 1,
               device='cpu', clock: str = 'wall', setup: Optional[Callable] = None,
               teardown: Optional[Callable] = None) -> Dict[str, Timing]:
    """Time several callables interleaved: warm-up all, then run 1 of each, run 2 of each, ...

    ``setup(name)``/``teardown(name, output)`` run around every timed call, outside the clock.
    Returns ``{name: Timing}``.
    """
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f'repeats must be a positive int, got {repeats!r}')
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f'warmup must be a non-negative int, got {warmup!r}')
    if clock not in CLOCKS:
        raise ValueError(f'clock must be one of {sorted(CLOCKS)}, got {clock!r}')
    if clock == 'cpu' and torch.device(device).type != 'cpu':
        raise ValueError('clock="cpu" measures host CPU time: use "wall" on an accelerator')
    now = CLOCKS[clock]
    results = {name: Timing() for name in fns}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
    sync_device(device)
    for _ in range(repeats):
        for name, fn in fns.items():
            if setup is not None:
                setup(name)
            start = now()
            out = fn()
            sync_device(device)
            results[name].times.append(now() - start)
            if teardown is not None:
                teardown(name, out)
            results[name].output = out
            del out
    return results


# ------------------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> List[str]:
    """Vector-ISA flags that decide GEMM speed (Linux only; empty elsewhere)."""
    wanted = ('avx2', 'fma', 'avx512f', 'avx512_bf16', 'avx512_vnni', 'amx_bf16', 'amx_tile')
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('flags'):
                    flags = set(line.split(':', 1)[1].split())
                    return [flag for flag in wanted if flag in flags]
    except OSError:
        pass
    return []


def describe_machine(device='cpu') -> Dict[str, Any]:
    """CPU model, logical cores, vector ISA, torch threads and version, GPU (if ``device`` is)."""
    info = dict(cpu=_cpu_model(), logical_cores=os.cpu_count(), isa=_cpu_flags(),
                torch_threads=torch.get_num_threads(), torch=torch.__version__)
    try:
        info['load_average'] = os.getloadavg()[0]
    except OSError:
        pass
    if torch.device(device).type == 'cuda' and torch.cuda.is_available():
        info['gpu'] = torch.cuda.get_device_name(device)
    return info


def machine_line(device='cpu') -> str:
    """One line for a table header, e.g. ``AMD EPYC ..., 2 cores (avx512f, ...), 2 threads``."""
    info = describe_machine(device)
    isa = f' ({", ".join(info["isa"])})' if info['isa'] else ''
    line = (f'{info["cpu"]}, {info["logical_cores"]} logical cores{isa}, '
            f'{info["torch_threads"]} torch threads, torch {info["torch"]}')
    if 'gpu' in info:
        line += f', {info["gpu"]}'
    if 'load_average' in info:
        line += f', load average {info["load_average"]:.1f}'
    return line


# -------------------------------------------------------------------------------------- tables
@dataclass
class Column:
    """A table column: row key, header text, and a format for the cell (``'{:.2f}'``)."""
    key: str
    header: Optional[str] = None
    fmt: str = '{}'
    align: str = 'right'

    def cell(self, row: Mapping[str, Any]) -> str:
        value = row.get(self.key)
        if value is None or value == '':
            return '-'
        try:
            return self.fmt.format(value)
        except (ValueError, TypeError):
            return str(value)


def _as_columns(columns: Sequence[Union[Column, str]]) -> List[Column]:
    return [c if isinstance(c, Column) else Column(c) for c in columns]


def markdown_table(rows: Sequence[Mapping[str, Any]],
                   columns: Sequence[Union[Column, str]]) -> str:
    """A GitHub markdown table of ``rows`` (dicts) with the given columns."""
    columns = _as_columns(columns)
    lines = ['| ' + ' | '.join(c.header or c.key for c in columns) + ' |',
             '|' + ''.join('---:|' if c.align == 'right' else '---|' for c in columns)]
    for row in rows:
        lines.append('| ' + ' | '.join(c.cell(row) for c in columns) + ' |')
    return '\n'.join(lines)


def write_csv(rows: Sequence[Mapping[str, Any]], path: str,
              fields: Optional[Sequence[str]] = None) -> str:
    """Write ``rows`` as CSV (every key of every row unless ``fields``); returns ``path``."""
    if fields is None:
        fields = list(dict.fromkeys(key for row in rows for key in row))
    if osp.dirname(path):
        os.makedirs(osp.dirname(path), exist_ok=True)
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction='ignore')
        writer.writeheader()
        writer.writerows(rows)
    return path


# -------------------------------------------------------------------------------------- charts
def bar_chart(ax, groups: Sequence[str], series: Sequence[str],
              values: Mapping[Tuple[str, str], float], *, baseline: Optional[str] = None,
              ratio: str = 'speedup', ylabel: str = '', title: str = '',
              value_fmt: str = '{:.3g}') -> None:
    """Grouped bars on a linear axis, each labelled with its ratio to ``baseline``'s bar.

    Args:
        ax: a matplotlib Axes.
        groups: x-axis groups (e.g. models); series: bars within a group (e.g. implementations).
        values: ``{(group, series): value}``; missing pairs leave a gap.
        baseline: series the ratios are taken against (its own bar shows its value).
        ratio: ``'speedup'`` writes ``baseline / value`` (for times: higher is faster),
            ``'relative'`` writes ``value / baseline`` (e.g. memory).
    """
    if ratio not in ('speedup', 'relative'):
        raise ValueError(f"ratio must be 'speedup' or 'relative', got {ratio!r}")
    width = 0.8 / max(1, len(series))
    top = max([v for v in values.values() if v is not None] + [0])
    for index, name in enumerate(series):
        xs, heights, labels = [], [], []
        for g, group in enumerate(groups):
            value = values.get((group, name))
            if value is None:
                continue
            xs.append(g + (index - (len(series) - 1) / 2) * width)
            heights.append(value)
            base = values.get((group, baseline)) if baseline else None
            if base and name != baseline and value > 0:
                labels.append(f'{(base / value if ratio == "speedup" else value / base):.2f}x')
            else:
                labels.append(value_fmt.format(value))
        bars = ax.bar(xs, heights, width, label=name)
        for bar, label in zip(bars, labels):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01 * top, label,
                    ha='center', va='bottom', fontsize=7, rotation=90 if len(series) > 3 else 0)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_ylim(0, top * 1.25 if top > 0 else 1)
    ax.set_yscale('linear')
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def panel_grid(num_panels: int, max_cols: int = 4) -> Tuple[int, int]:
    """(rows, cols) of a figure holding ``num_panels`` panels, at most ``max_cols`` per row."""
    if num_panels < 1 or max_cols < 1:
        raise ValueError(f'num_panels and max_cols must be >= 1, got {num_panels}, {max_cols}')
    cols = min(num_panels, max_cols)
    return math.ceil(num_panels / cols), cols


def panel_shape(image_hw: Tuple[int, int], panel_size: int) -> Tuple[int, int]:
    """Pixel (height, width) of one panel: the image scaled so its longer side is panel_size."""
    h, w = image_hw
    scale = panel_size / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


@contextlib.contextmanager
def removing(recorder) -> Iterator[Any]:
    """Yield ``recorder`` (an object holding forward hooks on a model, with ``remove()``) and
    remove its hooks on leaving, so an exception in between leaves the model unhooked."""
    try:
        yield recorder
    finally:
        recorder.remove()


# --------------------------------------------------------------------------------------- flags
def parse_hw(text: str) -> Tuple[int, int]:
    """``'800x1333'`` -> ``(800, 1333)``, with an error naming the expected form."""
    try:
        height, width = (int(v) for v in str(text).lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'sizes must look like 800x1333 (HxW), got {text!r}') from None
    if height <= 0 or width <= 0:
        raise argparse.ArgumentTypeError(f'sizes must be positive, got {text!r}')
    return height, width


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f'must be a positive integer, got {text!r}')
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'must be a non-negative integer, got {text!r}')
    return value


_COMMON_ARGS = {
    'device': (('--device', ), dict(default='cpu', help='cpu, cuda or cuda:N (default cpu)')),
    'dtypes': (('--dtypes', '--dtype'), dict(
        nargs='+', choices=list(DTYPES), default=['float32'],
        help='compute dtypes; anything but float32 runs under torch.autocast (default float32)')),
    'threads': (('--threads', ), dict(
        type=_positive_int, nargs='+', default=None,
        help='CPU thread counts to run (torch.set_num_threads; default: torch\'s current)')),
    'repeats': (('--repeats', '--repeat'), dict(
        type=_positive_int, default=3,
        help='timed runs; the median is reported (default %(default)s)')),
    'warmup': (('--warmup', ), dict(type=_non_negative_int, default=1,
                                    help='untimed runs before timing (default %(default)s)')),
    'timer': (('--timer', ), dict(
        choices=sorted(CLOCKS), default='wall',
        help='wall: elapsed time; cpu: process CPU time summed over threads, robust to other '
        'load on a shared machine (CPU only)')),
    'out_dir': (('--out-dir', ), dict(default=None,
                                      help='write the markdown, CSV and PNG outputs here')),
    'seed': (('--seed', ), dict(type=int, default=0, help='random seed (default %(default)s)')),
}


def add_common_args(parser: argparse.ArgumentParser, *names: str, **defaults) -> None:
    """Add the shared flags ``names`` (keys of the table above) to ``parser``.

    Every tool spells a concept the same way (``--repeats``, ``--out-dir``, ...); older
    spellings (``--repeat``, ``--dtype``) are accepted aliases. ``defaults`` override a flag's
    default, keyed by its dest (``repeats=5``).
    """
    for name in names:
        if name not in _COMMON_ARGS:
            raise ValueError(f'unknown common argument {name!r}; known: {sorted(_COMMON_ARGS)}')
        flags, kwargs = _COMMON_ARGS[name]
        kwargs = dict(kwargs, dest=name)
        if name in defaults:
            kwargs['default'] = defaults.pop(name)
        parser.add_argument(*flags, **kwargs)
    if defaults:
        raise ValueError(f'defaults given for arguments not added: {sorted(defaults)}')
