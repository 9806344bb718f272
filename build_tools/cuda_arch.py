"""CUDA architectures mmdet-detrx's extension is compiled for (used by ``setup.py``).

Policy, in order:

1. ``TORCH_CUDA_ARCH_LIST`` set: honoured as given (torch's syntax: ``"8.0;8.6+PTX"``, spaces
   also separate, named lists such as ``"Ampere"`` and ``"native"`` allowed). An entry the local
   nvcc cannot compile for is an error that says which entries it does support.
2. Unset, with a visible GPU: left unset, so ``torch.utils.cpp_extension`` builds for the visible
   GPU(s), PTX included for the newest, as it does for any extension.
3. Unset, no GPU (cross-building with ``FORCE_CUDA=1``): :data:`DEFAULT_CROSS_ARCH_LIST`, sm_70
   (V100) through sm_90 (H100) as cubins, plus PTX of sm_90 so newer GPUs (Blackwell sm_100 /
   sm_120) JIT-compile it at first use. Entries the local nvcc no longer supports (CUDA 13
   dropped sm_70/72) are left out with a note.

``python build_tools/cuda_arch.py`` prints the list a cross-build would use with the nvcc on
PATH. Needs neither torch nor a GPU.
"""
import os
import re
import shutil
import subprocess
import sys
from typing import List, Optional, Sequence

__all__ = ['DEFAULT_CROSS_ARCH_LIST', 'CudaArchError', 'nvcc_supported_archs', 'parse_arch_list',
           'resolve_arch_list']

# V100, T4, A100, A10/RTX 30xx, L4/L40/RTX 40xx, H100/H200 — and PTX of the newest for later GPUs.
DEFAULT_CROSS_ARCH_LIST = '7.0;7.5;8.0;8.6;8.9;9.0+PTX'

# torch.utils.cpp_extension's named lists (torch expands them itself; we expand to validate).
NAMED_ARCHES = {
    'Kepler+Tesla': '3.7', 'Kepler': '3.5+PTX', 'Maxwell+Tegra': '5.3', 'Maxwell': '5.0;5.2+PTX',
    'Pascal': '6.0;6.1+PTX', 'Volta+Tegra': '7.2', 'Volta': '7.0+PTX', 'Turing': '7.5+PTX',
    'Ampere+Tegra': '8.7', 'Ampere': '8.0;8.6+PTX', 'Ada': '8.9+PTX', 'Hopper': '9.0+PTX',
    'Blackwell+Tegra': '11.0', 'Blackwell': '10.0;10.3;12.0;12.1+PTX',
}

_ENTRY = re.compile(r'(\d+)\.(\d+)([af]?)(\+PTX)?')


class CudaArchError(ValueError):
    """An architecture list that cannot be built; the message says what to do."""


def parse_arch_list(arch_list: str) -> List[str]:
    """``"Ampere 9.0+PTX"`` -> ``['8.0', '8.6+PTX', '9.0+PTX']`` (named lists expanded)."""
    entries = []
    for token in re.split(r'[;\s]+', arch_list.strip()):
        if not token:
            continue
        expanded = NAMED_ARCHES.get(token, token)
        for entry in expanded.split(';'):
            if _ENTRY.fullmatch(entry) is None:
                raise CudaArchError(
                    f'TORCH_CUDA_ARCH_LIST={arch_list!r}: cannot parse {token!r}; use entries '
                    'like "8.0", "9.0a", "8.6+PTX" separated by ";" (or a name such as '
                    f'{", ".join(sorted(NAMED_ARCHES))}), or "native"')
            if entry not in entries:
                entries.append(entry)
    if not entries:
        raise CudaArchError(f'TORCH_CUDA_ARCH_LIST={arch_list!r} names no architecture')
    return entries


def _compute_capability(entry: str) -> str:
    """``'9.0a+PTX'`` -> ``'90a'`` (nvcc's ``compute_90a`` without the prefix)."""
    major, minor, suffix, _ = _ENTRY.fullmatch(entry).groups()
    return f'{major}{minor}{suffix}'


def nvcc_supported_archs(nvcc: Optional[str] = None) -> Optional[List[str]]:
    """``nvcc --list-gpu-arch`` as ``['75', '80', ...]``; None when nvcc is absent or too old to
    list them (then nothing is checked here and nvcc itself reports an unsupported target)."""
    nvcc = nvcc or _find_nvcc()
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, '--list-gpu-arch'], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    archs = re.findall(r'compute_(\d+[af]?)', out)
    return archs or None


def _find_nvcc() -> Optional[str]:
    for home in (os.environ.get('CUDA_HOME'), os.environ.get('CUDA_PATH')):
        if home and os.path.isfile(os.path.join(home, 'bin', 'nvcc')):
            return os.path.join(home, 'bin', 'nvcc')
    return shutil.which('nvcc')


def _supports(entry: str, supported: Sequence[str]) -> bool:
    capability = _compute_capability(entry)
    # nvcc lists compute_90 but accepts compute_90a (arch-specific) whenever it knows compute_90.
    return capability in supported or capability.rstrip('af') in supported


def resolve_arch_list(env_value: Optional[str], gpu_visible: bool,
                      supported: Optional[Sequence[str]] = None, nvcc: str = 'nvcc',
                      log=print) -> Optional[str]:
    """The ``TORCH_CUDA_ARCH_LIST`` to build with, or None to let torch pick the visible GPUs.

    ``supported``: what the local nvcc compiles for (:func:`nvcc_supported_archs`); None skips
    the check. Raises :class:`CudaArchError` for a list that cannot be built.
    """
    if env_value is not None and env_value.strip():
        if env_value.strip() == 'native':
            if not gpu_visible:
                raise CudaArchError('TORCH_CUDA_ARCH_LIST=native needs a visible GPU; set the '
                                    f'architectures explicitly, e.g. "{DEFAULT_CROSS_ARCH_LIST}"')
            return env_value
        entries = parse_arch_list(env_value)
        if supported is not None:
            bad = [e for e in entries if not _supports(e, supported)]
            if bad:
                raise CudaArchError(
                    f'TORCH_CUDA_ARCH_LIST={env_value!r}: {nvcc} cannot compile for '
                    f'{", ".join(bad)}; it supports {_as_versions(supported)}. Remove those '
                    'entries, or build with a CUDA toolkit that still supports them.')
        return env_value
    if gpu_visible:
        return None
    entries = parse_arch_list(DEFAULT_CROSS_ARCH_LIST)
    if supported is not None:
        kept = [e for e in entries if _supports(e, supported)]
        dropped = [e.replace('+PTX', '') for e in entries if e not in kept]
        if not kept:
            raise CudaArchError(
                f'{nvcc} supports none of the default architectures {DEFAULT_CROSS_ARCH_LIST} '
                f'(it supports {_as_versions(supported)}); set TORCH_CUDA_ARCH_LIST')
        if not kept[-1].endswith('+PTX'):
            kept[-1] += '+PTX'
        if dropped:
            names = ', '.join('sm_' + d.replace('.', '') for d in dropped)
            log(f'mmdet-detrx: {nvcc} no longer supports {names}; building without it')
        entries = kept
    value = ';'.join(entries)
    log(f'mmdet-detrx: no GPU visible, cross-building for TORCH_CUDA_ARCH_LIST="{value}" '
        '(set TORCH_CUDA_ARCH_LIST to choose)')
    return value


def _as_versions(supported: Sequence[str]) -> str:
    return ' '.join(f'{s[:-1]}.{s[-1]}' if s[-1].isdigit() else f'{s[:-2]}.{s[-2:]}'
                    for s in supported)


if __name__ == '__main__':
    try:
        print(resolve_arch_list(None, gpu_visible=False, supported=nvcc_supported_archs(),
                                log=lambda message: print(message, file=sys.stderr)))
    except CudaArchError as error:
        sys.exit(f'error: {error}')
