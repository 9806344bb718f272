"""Pieces the tools share: timing, machine description, tables, charts, panels, flags, exit status.

The one helper module of ``mmdet_detrx.tools`` (``from mmdet_detrx.tools.common import ...``).

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
  aliases); :func:`add_shape_arg`: ``--shape H W``, mmdet's spelling, with ``HxW`` accepted.
* :class:`PeakMemory`, :func:`memory_available_bytes`: peak memory growth over a region (CUDA
  allocator or the process's resident set) and the memory left on the machine;
  :func:`measure_in_subprocess`: one measurement in a fresh process, so its peak is its own.
* :func:`load_config`, :func:`build_test_runner`: a config with ``--cfg-options`` applied as our
  train/test tools do, and a test-ready Runner with a checkpoint loaded;
  :func:`act_layers` / :func:`require_act_layers`: a model's ACT attention layers.
* :func:`exit_status`: a tool's ``main()`` result as a process exit status (``main`` returns its
  rows or report to Python callers).
"""
import argparse
import contextlib
import csv
import ctypes
import gc
import json
import math
import os
import os.path as osp
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    'Timing', 'CLOCKS', 'DTYPES', 'sync_device', 'time_call', 'time_calls', 'describe_machine',
    'machine_line', 'Column', 'markdown_table', 'write_csv', 'bar_chart', 'panel_grid',
    'panel_shape', 'removing', 'add_common_args', 'add_shape_arg', 'parse_hw', 'exit_status',
    'PeakMemory', 'memory_available_bytes', 'measure_in_subprocess', 'load_config',
    'build_test_runner', 'act_layers', 'require_act_layers'
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


# -------------------------------------------------------------------------------------- memory
_LIBC = ctypes.CDLL('libc.so.6') if sys.platform.startswith('linux') else None


def _status_kib(field_name: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field_name + ':'):
                return int(line.split()[1])
    raise RuntimeError(f'{field_name} missing from /proc/self/status')


def memory_available_bytes() -> int:
    """``MemAvailable`` of ``/proc/meminfo`` (Linux)."""
    with open('/proc/meminfo') as f:
        for line in f:
            if line.startswith('MemAvailable:'):
                return int(line.split()[1]) * 1024
    raise RuntimeError('MemAvailable missing from /proc/meminfo')


class PeakMemory:
    """Peak memory growth of this process over regions (``start()`` ... ``stop()``), in bytes;
    ``peak`` is the maximum over the regions measured.

    On CUDA: the allocator's high-water mark over what was allocated at ``start``. On CPU (Linux):
    the resident set's — at ``start`` retained free heap is handed back (``malloc_trim``, so reuse
    cannot hide growth) and the kernel's high-water mark ``VmHWM`` is reset to the current
    resident set through ``/proc/self/clear_refs``; ``stop`` reads it. Either way what was held
    before ``start`` (weights, optimizer state) is excluded.
    """

    def __init__(self, device='cpu') -> None:
        self.device = torch.device(device)
        self.baseline = self.peak = 0

    @staticmethod
    def supported(device='cpu') -> bool:
        """Whether :meth:`start` works here (CPU: needs ``/proc/self/clear_refs``)."""
        try:
            PeakMemory(device).start()
            return True
        except OSError:
            return False

    def start(self) -> None:
        if self.device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            return
        gc.collect()
        if _LIBC is not None:
            _LIBC.malloc_trim(0)
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # reset VmHWM to the current RSS
        self.baseline = _status_kib('VmRSS') * 1024

    def stop(self) -> int:
        if self.device.type == 'cuda':
            grown = torch.cuda.max_memory_allocated(self.device) - self.baseline
        else:
            grown = _status_kib('VmHWM') * 1024 - self.baseline
        self.peak = max(self.peak, grown)
        return self.peak


def measure_in_subprocess(module: str, argv: Sequence[str], what: str) -> Dict[str, Any]:
    """``python -m module *argv`` in a fresh process (its peak memory is its own, nothing of an
    earlier measurement lingers): the JSON object its last stdout line holds. A failure exits
    naming ``what`` with the child's stderr."""
    result = subprocess.run([sys.executable, '-m', module, *argv], capture_output=True,
                            text=True)
    if result.returncode:
        sys.exit(f'{what} failed:\n{result.stderr}')
    return json.loads(result.stdout.strip().splitlines()[-1])


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


class _ShapeAction(argparse.Action):
    """``--shape H W`` (two values, mmdet's spelling) or ``--shape HxW`` (one) -> ``(H, W)``."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            if len(values) == 1:
                shape = parse_hw(values[0])
            elif len(values) == 2:
                shape = tuple(int(v) for v in values)
            else:
                raise ValueError
        except (ValueError, argparse.ArgumentTypeError):
            parser.error(f'{option_string} takes H W (e.g. 800 1333) or HxW (800x1333), got '
                         f'{" ".join(values)!r}')
        if min(shape) <= 0:
            parser.error(f'{option_string} must be positive, got {shape[0]} {shape[1]}')
        setattr(namespace, self.dest, shape)


def add_shape_arg(parser: argparse.ArgumentParser, default: Optional[Tuple[int, int]] = (800, 1333),
                  help: str = 'input height and width') -> None:
    """``--shape H W`` (``HxW`` accepted too) into ``args.shape`` as an ``(H, W)`` tuple."""
    suffix = f' (default {default[0]} {default[1]})' if default else ''
    parser.add_argument('--shape', nargs='+', action=_ShapeAction, metavar=('H', 'W'),
                        default=tuple(default) if default else None,
                        help=f'{help}: H W or HxW{suffix}')


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


def exit_status(result: Any) -> int:
    """The exit status of a tool whose ``main()`` returned ``result``: an int is the status;
    anything else (the rows, report or files a tool returns to Python callers) means success.
    Errors leave ``main`` as exceptions or ``SystemExit``."""
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


# ------------------------------------------------------------------------------- configs, models
def load_config(path: str, cfg_options: Optional[Mapping] = None,
                weights_from_checkpoint: bool = False):
    """``Config.fromfile(path)`` with ``--cfg-options`` merged as our train/test tools merge them
    (unknown top-level keys fail, ``data_root=DIR`` moves every data path). With
    ``weights_from_checkpoint`` the backbone's ``init_cfg`` is dropped: a checkpoint will hold
    every weight, so no pretrained file is downloaded."""
    from mmengine.config import Config

    from mmdet_detrx.utils.cfg_options import merge_cfg_options
    cfg = Config.fromfile(path)
    if cfg_options:
        merge_cfg_options(cfg, cfg_options)
    if weights_from_checkpoint and cfg.model.get('backbone', {}).get('init_cfg') is not None:
        cfg.model.backbone.init_cfg = None
    return cfg


def build_test_runner(config: str, checkpoint: str, cfg_options: Optional[Mapping],
                      work_dir: str):
    """A test-ready Runner of ``config`` with ``checkpoint`` loaded (every weight from it),
    working under ``work_dir``: what ``Runner.test()`` does before its loop, so that a tool can
    run the test loop once per setting (``runner.test_loop.run()``) and call
    ``runner.call_hook('after_run')`` at the end."""
    from mmengine.runner import Runner
    cfg = load_config(config, cfg_options, weights_from_checkpoint=True)
    cfg.load_from = checkpoint
    cfg.work_dir = work_dir
    cfg.setdefault('env_cfg', {})['cudnn_benchmark'] = False
    runner = Runner.from_cfg(cfg)
    runner._test_loop = runner.build_test_loop(runner._test_loop)
    runner.call_hook('before_run')
    runner.load_or_resume()
    return runner


def act_layers(model: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    """``{module name: layer}`` of the model's ``AdaptiveClusteringAttention`` layers, in
    module order (empty for a model without ACT)."""
    from mmdet_detrx.models.layers import AdaptiveClusteringAttention
    return {name: m for name, m in model.named_modules()
            if isinstance(m, AdaptiveClusteringAttention)}


def require_act_layers(model: torch.nn.Module, source: str) -> List[torch.nn.Module]:
    """The model's ACT layers (module order), or a ``ValueError`` saying ``source`` (a config,
    'the model') has none."""
    layers = list(act_layers(model).values())
    if not layers:
        raise ValueError(f'{source} has no AdaptiveClusteringAttention layer; use an ACT config '
                         '(configs/act/, or encoder self_attn_cfg of that type)')
    return layers
