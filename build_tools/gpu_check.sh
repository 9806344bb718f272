#!/usr/bin/env bash
# One-shot GPU check of the multi-scale deformable attention CUDA kernels.
#
#   build_tools/gpu_check.sh OUTDIR            on a machine with an NVIDIA GPU
#   build_tools/gpu_check.sh --dry-run OUTDIR  without a GPU: every stage's command is prepared and the
#                                        CPU-reachable parts run (small case and benchmark on the
#                                        CPU, CUDA tests collected and skipped), report written
#
# Made for a bare GPU machine with a CUDA build of torch (e.g. torch 2.11+cu130, Python 3.12),
# nvcc and compute-sanitizer, without mmcv / mmdet, in about 8 minutes on one H100 / H200:
#
#   env      GPU, driver, torch, nvcc; device settings read (read-only) for the before/after check;
#            device-to-device copy bandwidth (the achievable DRAM ceiling)
#   build    FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST = the present GPU's compute capability only,
#            in place (python setup.py build_ext --inplace); asserts the CUDA kernels registered
#   tests    tests/test_ops/test_ms_deform_attn_cuda.py + test_ms_deform_attn.py (CPU and CUDA)
#   memcheck compute-sanitizer --tool memcheck on a small case (4 dtypes, odd C, misaligned value,
#            points off the maps; forward + backward against the grid_sample reference)
#   bench    tools/analysis/benchmark_msda.py --device cuda, Deformable-DETR encoder and decoder
#            shapes, float32 / float16 / bfloat16, --peak-gbps from the GPU's datasheet
#   extra    (only while the time budget lasts) racecheck + synccheck on the small case, the
#            > 2^31-element test (--runslow -k int32), float32 at batch 8 (value beyond L2)
#
# Writes OUTDIR/report.md (summary, ratios vs the reference, % of DRAM peak, targets) and
# OUTDIR/logs.txt (every stage's full output). Exit status 0 when every required stage passed.
#
# The script never changes the device's state: no nvidia-smi -pm / -ac / -lgc / -pl / -c / -r,
# no MIG changes, no ncu (which locks clocks by default). It reads the persistence, compute and
# MIG modes, application clocks and power limit before and after and reports whether they match.
#
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (default 450: the whole run's time
# budget; optional stages are skipped when it runs out), GPU_PEAK_GBPS (override the datasheet
# DRAM bandwidth), MAX_JOBS (default: all cores), BENCH_REPEAT (default 20).
set -uo pipefail

usage() {
    sed -n '3,5p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit "${1:-2}"
}

DRY_RUN=0
OUTDIR=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        -h | --help) usage 0 ;;
        -*) echo "gpu_check.sh: unknown option $1" >&2; usage 2 ;;
        *)
            if [ -n "$OUTDIR" ]; then
                echo "gpu_check.sh: one OUTDIR only (got '$OUTDIR' and '$1')" >&2
                usage 2
            fi
            OUTDIR=$1
            ;;
    esac
    shift
done
if [ -z "$OUTDIR" ]; then
    echo "gpu_check.sh: OUTDIR missing" >&2
    usage 2
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}
BENCH_REPEAT=${BENCH_REPEAT:-20}
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT
STAGES=$WORK/stages.tsv   # name <TAB> status <TAB> seconds <TAB> note
: >"$STAGES"
: >"$OUTDIR/logs.txt"
DEADLINE=$((SECONDS + BUDGET_S))
export PYTHONUNBUFFERED=1
# The tools import mmdet_detrx from this tree (a bare machine has not installed the package).
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DRY_RUN" = 1 ]; then
    export CUDA_VISIBLE_DEVICES=""  # a dry run touches no GPU, even where there is one
fi
cd "$ROOT" || exit 2

say() { echo "[gpu_check] $*"; }

record() {  # record NAME STATUS SECONDS NOTE
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$STAGES"
    say "$1: $2 (${3}s) $4"
}

# stage NAME CAP_S RESERVE_S CMD...: run CMD under a time limit of CAP_S seconds, cut so that
# RESERVE_S seconds of the budget remain for the required stages after it. Output goes to
# $WORK/NAME.log and OUTDIR/logs.txt. Returns CMD's status (124 on timeout, 125 when skipped).
stage() {
    local name=$1 cap=$2 reserve=$3
    shift 3
    local left=$((DEADLINE - SECONDS - reserve))
    local limit=$((cap < left ? cap : left))
    local log=$WORK/$name.log
    if [ "$limit" -lt 15 ]; then
        record "$name" skipped 0 "time budget spent"
        printf '\n===== %s: skipped (time budget spent)\n' "$name" >>"$OUTDIR/logs.txt"
        return 125
    fi
    say "$name (limit ${limit}s): $*"
    local start=$SECONDS rc
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    local took=$((SECONDS - start))
    {
        printf '\n===== %s (limit %ss, %ss, exit %s): %s\n' "$name" "$limit" "$took" "$rc" "$*"
        cat "$log"
    } >>"$OUTDIR/logs.txt"
    case $rc in
        0) record "$name" passed "$took" "" ;;
        124 | 137) record "$name" timeout "$took" "killed after ${limit}s" ;;
        *) record "$name" failed "$took" "exit status $rc (see logs.txt)" ;;
    esac
    return "$rc"
}

# Device settings that a check must leave as it found them (read-only query).
device_state() {
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=index,name,persistence_mode,compute_mode,mig.mode.current,clocks.applications.graphics,clocks.applications.memory,power.limit,ecc.mode.current \
            --format=csv,noheader 2>&1
    else
        echo "nvidia-smi not found"
    fi
}

# compute-sanitizer: on the PATH, else in the toolkit.
find_sanitizer() {
    local candidate
    for candidate in "${COMPUTE_SANITIZER:-}" "$(command -v compute-sanitizer 2>/dev/null)" \
        "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
        /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
        if [ -n "$candidate" ] && [ -x "$candidate" ]; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}
SANITIZER=$(find_sanitizer || true)

# ---------------------------------------------------------------- helper programs (written now)
cat >"$WORK/env.py" <<'PY'
"""Versions, the GPU, its datasheet DRAM bandwidth and a measured device-to-device copy."""
import json, os, platform, statistics, sys
import torch

# Datasheet DRAM bandwidth (GB/s) by device-name fragment; first match wins.
PEAKS = [('GH200', 4000), ('H200', 4800), ('H100 NVL', 3900), ('H100 PCIe', 2000),
         ('H100', 3350), ('A100-SXM4-80GB', 2039), ('A100 80GB PCIe', 1935),
         ('A100-PCIE-40GB', 1555), ('A100-SXM4-40GB', 1555), ('A100', 1555), ('L40S', 864),
         ('L4', 300), ('A10', 600), ('RTX 4090', 1008), ('RTX 3090', 936), ('V100', 900),
         ('T4', 320)]
info = {'python': platform.python_version(), 'torch': torch.__version__,
        'torch_cuda': torch.version.cuda, 'cuda_available': torch.cuda.is_available()}
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info.update(gpu=props.name, capability='%d.%d' % (props.major, props.minor),
                sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
    override = os.environ.get('GPU_PEAK_GBPS')
    peak = float(override) if override else next(
        (gbps for key, gbps in PEAKS if key in props.name), None)
    info['peak_gbps'] = peak
    info['peak_source'] = 'GPU_PEAK_GBPS' if override else ('datasheet' if peak else 'unknown')
    # Copy bandwidth: 2 GiB read + 2 GiB written per copy, median of 10 after a warm-up.
    n = 2**29
    src = torch.empty(n, dtype=torch.float32, device='cuda').fill_(1.0)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(); dst.copy_(src); end.record(); end.synchronize()
        times.append(start.elapsed_time(end))
    info['copy_gbps'] = round(2 * n * 4 / statistics.median(times) / 1e6)
    del src, dst
else:
    info.update(gpu=None, capability=os.environ.get('DRY_RUN_ARCH', '9.0'), peak_gbps=float(
        os.environ.get('GPU_PEAK_GBPS', 3350)), peak_source='dry run placeholder',
        copy_gbps=None)
print(json.dumps(info))
PY

cat >"$WORK/probe.py" <<'PY'
"""The extension in this tree loads and registered CUDA (and CPU) kernels for both ops."""
import sys
import torch
import mmdet_detrx.ops as ops
from mmdet_detrx import _C
want_cuda = sys.argv[1] == '1'
print('extension:', _C.__file__)
assert ops.native_available(), 'mmdet_detrx.ops.native_available() is False'
for op in ('detrx::ms_deform_attn_forward', 'detrx::ms_deform_attn_backward'):
    keys = {k: torch._C._dispatch_has_kernel_for_dispatch_key(op, k) for k in ('CPU', 'CUDA')}
    print(op, keys)
    assert keys['CPU'], f'{op}: no CPU kernel'
    assert keys['CUDA'] or not want_cuda, f'{op}: no CUDA kernel registered'
print('probe ok')
PY

cat >"$WORK/small_case.py" <<'PY'
"""A small forward + backward in every dtype against the grid_sample reference (for the
sanitizers: few launches, every kernel variant: vector widths 4 / 2 / 1, misaligned value,
points off the maps, a batch not divisible by im2col_step)."""
import sys
import torch
from mmdet_detrx.ops import ms_deform_attn, ms_deform_attn_pytorch

device = sys.argv[1]
dtypes = sys.argv[2].split(',')
gen = torch.Generator().manual_seed(0)


def inputs(batch, heads, channels, shapes, queries, points, dtype, misaligned=False, off=False):
    spatial = torch.tensor(shapes)
    sizes = spatial.prod(1)
    start = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    value = torch.randn(batch, int(sizes.sum()), heads, channels, generator=gen)
    loc = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=gen) * 1.3 - 0.15
    if off:
        loc[:, ::2] = torch.tensor([-100.0, 2.0])  # off the maps, finite in fp16
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=gen)
    value, loc, weights = (t.to(device, dtype) for t in (value, loc, weights))
    if misaligned:  # same values one element into a buffer: no packed loads
        storage = torch.empty(value.numel() + 1, dtype=dtype, device=device)
        value = storage[1:].view(value.shape).copy_(value)
    return value, spatial.to(device), start.to(device), loc, weights


def grads(fn, value, spatial, start, loc, weights):
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, weights)]
    out = fn(leaves[0], spatial, start, leaves[1], leaves[2])
    out.backward(torch.ones_like(out))
    return [out.detach().double()] + [t.grad.double() for t in leaves]


native = lambda v, s, i, l, w: ms_deform_attn(v, s, i, l, w, im2col_step=2)
reference = lambda v, s, i, l, w: ms_deform_attn_pytorch(v, s, l, w)
# Bounds relative to the largest result: a few units of each dtype's rounding (2^-11 fp16,
# 2^-8 bf16), as the kernels accumulate in fp32 and round once.
tol = {'float64': 1e-9, 'float32': 1e-5, 'float16': 1e-3, 'bfloat16': 1.6e-2}
cases = 0
for name in dtypes:
    dtype = getattr(torch, name)
    for channels, extra in ((32, {}), (30, {}), (71, {}), (8, {'misaligned': True}),
                            (8, {'off': True})):
        args = inputs(3, 2, channels, [(7, 9), (4, 5), (1, 1)], 6, 2, dtype, **extra)
        # The oracle: the reference in float64 on the same (already rounded) inputs.
        exact = [t.double() if t.is_floating_point() else t for t in args]
        got, want = grads(native, *args), grads(reference, *exact)
        for a, e in zip(got, want):
            bound = tol[name] * (1 + e.abs().max().item())
            err = (a - e).abs().max().item()
            assert err <= bound, f'{name} C={channels} {extra}: max error {err} > {bound}'
        cases += 1
if device == 'cuda':
    torch.cuda.synchronize()
print(f'small case ok: {cases} cases on {device}')
PY

cat >"$WORK/report.py" <<'PY'
"""Assemble OUTDIR/report.md from the stage table, the environment and the benchmark tables."""
import json, os, re, sys
work, outdir, dry = sys.argv[1], sys.argv[2], sys.argv[3] == '1'


def read(name):
    path = os.path.join(work, name)
    return open(path).read() if os.path.exists(path) else ''


env = {}
for line in read('env.log').splitlines()[::-1]:
    if line.startswith('{'):
        env = json.loads(line)
        break
stages = [line.split('\t') for line in read('stages.tsv').splitlines() if line]
lines = ['# GPU check: multi-scale deformable attention', '']
if dry:
    lines += ['**DRY RUN: nothing ran on a GPU.** Commands were prepared; the small case and the '
              'benchmark ran on the CPU, the CUDA tests were collected and skipped. No number '
              'below is a CUDA measurement.', '']
gpu = (f'{env.get("gpu")} (sm {env.get("capability")}, {env.get("sms")} SMs, '
       f'{env.get("memory_gib")} GiB)' if env.get('gpu') else
       f'none (arch placeholder {env.get("capability")})')
lines += [f'- GPU: {gpu}',
          f'- torch {env.get("torch")} (CUDA {env.get("torch_cuda")}), Python {env.get("python")}',
          f'- nvcc: {read("nvcc.txt").strip() or "not found"}',
          f'- driver: {read("driver.txt").strip() or "n/a"}',
          f'- DRAM peak used for %: {env.get("peak_gbps")} GB/s ({env.get("peak_source")}); '
          f'measured device-to-device copy: {env.get("copy_gbps")} GB/s (read + written)', '']
before, after = read('state_before.txt').strip(), read('state_after.txt').strip()
same = before == after
lines += ['## Device state', '',
          'Read-only query before and after (persistence, compute and MIG mode, application '
          'clocks, power limit, ECC): ' + ('**unchanged**' if same else '**CHANGED**'), '',
          '```', before, '```', '']
if not same:
    lines += ['after:', '```', after, '```', '']
lines += ['## Stages', '', '| stage | status | seconds | note |', '|---|---|---|---|']
lines += [f'| {s[0]} | {s[1]} | {s[2]} | {s[3] if len(s) > 3 else ""} |' for s in stages]
lines.append('')

SUMMARY = re.compile(r'^(?:=+ )?(\d+ (?:passed|failed|skipped|error|deselected).* in [\d.]+s\S*)(?: \(.*\))?(?: =+)?$', re.M)
summary = SUMMARY.findall(read('tests.log'))
lines += ['## Tests', '', f'tests/test_ops: {summary[-1] if summary else "no summary"}']
slow = SUMMARY.findall(read('int32.log'))
if slow:
    lines.append(f'> 2^31-element test (--runslow -k int32): {slow[-1]}')
skips = re.findall(r'^SKIPPED .*$', read('tests.log'), re.M)
if skips:
    lines += ['', 'Skipped:', ''] + [f'- `{s}`' for s in skips[:20]]
lines.append('')

lines += ['## compute-sanitizer', '']
for tool in ('memcheck', 'racecheck', 'synccheck', 'small_case'):
    text = read(f'{tool}.log')
    errors = re.findall(r'ERROR SUMMARY: .*', text)
    ok = re.findall(r'small case ok.*', text)
    if text:
        lines.append(f'- {tool}: {errors[-1] if errors else "no ERROR SUMMARY line"}; '
                     f'{ok[-1] if ok else "small case did not finish"}')
lines.append('')

# Benchmark tables: | shape | queries | threads | impl | forward ms | fwd+bwd ms | speed-up |...
rows = {}
lines += ['## Benchmark (tools/analysis/benchmark_msda.py)', '']
for dtype in ('float32', 'float16', 'bfloat16', 'float32_b8'):
    text = read(f'bench_{dtype}.log')
    if not text:
        continue
    lines += [f'### {dtype}', ''] + [l for l in text.splitlines()
                                      if l.startswith(('#', '|'))] + ['']
    for l in text.splitlines():
        cells = [c.strip() for c in l.strip().strip('|').split('|')]
        if len(cells) >= 6 and re.fullmatch(r'[\d.]+', cells[4] or 'x'):
            gbps = re.match(r'(\d+)', cells[7]) if len(cells) > 7 else None
            rows[(dtype, cells[0], cells[3])] = (float(cells[4]), float(cells[5]),
                                                 int(gbps.group(1)) if gbps else None)
if rows:
    peak, copy = env.get('peak_gbps'), env.get('copy_gbps')
    lines += ['### Summary', '',
              '| dtype | shape | native fwd ms | fwd vs reference | fwd+bwd vs reference | '
              'fwd GB/s | % of peak | % of copy |', '|---|---|---|---|---|---|---|---|']
    for (dtype, shape, impl), (fwd, fb, gbps) in rows.items():
        if impl != 'native':
            continue
        ref = rows.get((dtype, shape, 'pytorch'))
        cells = [dtype, shape, f'{fwd:.3f}',
                 f'{ref[0] / fwd:.1f}x' if ref else '-', f'{ref[1] / fb:.1f}x' if ref else '-',
                 str(gbps) if gbps is not None else '-',
                 f'{100 * gbps / peak:.0f}%' if gbps is not None and peak else '-',
                 f'{100 * gbps / copy:.0f}%' if gbps is not None and copy else '-']
        lines.append('| ' + ' | '.join(cells) + ' |')
    lines += ['', '### Targets', '']
    for (dtype, shape, impl), (fwd, fb, gbps) in rows.items():
        if impl == 'native' and gbps is not None and peak:
            share = 100 * gbps / peak
            lines.append(f'- {shape} forward, {dtype}: {share:.0f}% of DRAM peak '
                         f'(target >= 30%): {"met" if share >= 30 else "NOT met"}')
    for dtype in ('float16', 'bfloat16'):
        for (d, shape, impl), (fwd, fb, _) in rows.items():
            base = rows.get(('float32', shape, 'native'))
            if d == dtype and impl == 'native' and base:
                lines.append(f'- {shape} {dtype} vs float32: forward {base[0] / fwd:.2f}x, '
                             f'fwd+bwd {base[1] / fb:.2f}x (target > 1): '
                             f'{"met" if fwd < base[0] and fb < base[1] else "NOT met"}')
    lines.append('')
    lines.append('Bandwidth: compulsory bytes (inputs read once, outputs written once) / median '
                 'time; the reference is the grid_sample implementation on the same device. At '
                 'B=2 value (45 MB in float32) fits in the L2 of an H100 / H200 and may stay '
                 'there between repeats (most of the decoder shapes\' compulsory bytes); at B=8 '
                 '(float32_b8, 182 MB) it cannot.')
if dry:
    lines += ['', '(dry run: CPU timings of a tiny shape, only to exercise the pipeline)']
open(os.path.join(outdir, 'report.md'), 'w').write('\n'.join(lines) + '\n')
print('\n'.join(lines))
PY

# ---------------------------------------------------------------- env
say "root $ROOT, outdir $OUTDIR, budget ${BUDGET_S}s, dry run: $DRY_RUN"
device_state >"$WORK/state_before.txt"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=driver_version --format=csv,noheader >"$WORK/driver.txt" 2>&1
fi
if command -v nvcc >/dev/null 2>&1; then
    nvcc --version | grep -o 'release [0-9.]*, V[0-9.]*' >"$WORK/nvcc.txt"
fi
if ! stage env 120 240 "$PYTHON" "$WORK/env.py"; then
    device_state >"$WORK/state_after.txt"
    "$PYTHON" "$WORK/report.py" "$WORK" "$OUTDIR" "$DRY_RUN" >/dev/null
    say "FAILED: torch does not import or sees no usable GPU; see $OUTDIR/logs.txt"
    exit 1
fi
ENV_JSON=$(grep '^{' "$WORK/env.log" | tail -n 1)
json_field() { "$PYTHON" -c 'import json,sys; v=json.loads(sys.argv[1]).get(sys.argv[2]); print("" if v is None else v)' "$ENV_JSON" "$1"; }
ARCH=$(json_field capability)
PEAK=$(json_field peak_gbps)
CUDA_AVAILABLE=$(json_field cuda_available)
if [ "$DRY_RUN" = 0 ] && [ "$CUDA_AVAILABLE" != True ]; then
    record env failed 0 "torch sees no CUDA device (use --dry-run on a machine without a GPU)"
    device_state >"$WORK/state_after.txt"
    "$PYTHON" "$WORK/report.py" "$WORK" "$OUTDIR" "$DRY_RUN" >/dev/null
    exit 1
fi
say "arch $ARCH, peak ${PEAK:-unknown} GB/s"

# ---------------------------------------------------------------- build
if [ "$DRY_RUN" = 1 ]; then
    record build "dry run" 0 "would run: FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=$MAX_JOBS $PYTHON setup.py build_ext --inplace"
    stage probe 60 200 "$PYTHON" "$WORK/probe.py" 0
else
    if ! stage build 240 200 env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" \
        MAX_JOBS="$MAX_JOBS" "$PYTHON" setup.py build_ext --inplace ||
        ! stage probe 60 200 "$PYTHON" "$WORK/probe.py" 1; then
        # Nothing below can pass without the CUDA kernels: report now, keep the device time.
        for name in tests memcheck bench_float32 bench_float16 bench_bfloat16; do
            record "$name" skipped 0 "the build or the probe failed"
        done
        device_state >"$WORK/state_after.txt"
        "$PYTHON" "$WORK/report.py" "$WORK" "$OUTDIR" "$DRY_RUN" >/dev/null
        say "FAILED: build / probe (report: $OUTDIR/report.md)"
        exit 1
    fi
fi

# ---------------------------------------------------------------- tests
# test_cuda_compile.py needs no GPU (CPU CI runs it): not spent here. A dry run only collects
# the CUDA tests (they skip); the CPU tests are make test's.
TESTS=(tests/test_ops/test_ms_deform_attn_cuda.py)
if [ "$DRY_RUN" = 0 ]; then
    TESTS+=(tests/test_ops/test_ms_deform_attn.py)
fi
stage tests 180 150 "$PYTHON" -m pytest -q -rs -p no:cacheprovider "${TESTS[@]}"
if [ "$DRY_RUN" = 0 ] && [ -f "$WORK/tests.log" ] &&
    ! grep -qE '[0-9]+ passed' "$WORK/tests.log"; then
    record tests-ran failed 0 "no test passed: were the CUDA tests skipped?"
fi

# ---------------------------------------------------------------- sanitizers + benchmark
if [ "$DRY_RUN" = 1 ]; then
    record memcheck-plan "dry run" 0 "compute-sanitizer: ${SANITIZER:-not found}; small case on the CPU instead"
    stage small_case 120 60 "$PYTHON" "$WORK/small_case.py" cpu float64,float32,bfloat16
    stage bench_float32 120 0 "$PYTHON" tools/analysis/benchmark_msda.py --device cpu \
        --dtype float32 --shapes small --threads 1 --repeat 1 --warmup 0 --peak-gbps "$PEAK"
else
    if [ -z "$SANITIZER" ]; then
        record memcheck failed 0 "compute-sanitizer not found (set COMPUTE_SANITIZER)"
        SANITIZER=compute-sanitizer  # the stages below then fail fast with 'not found'
    fi
    # One cudaMalloc per tensor, so an access past a tensor's end is outside any allocation.
    stage memcheck 150 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck \
        --error-exitcode 3 --leak-check no --print-limit 20 \
        "$PYTHON" "$WORK/small_case.py" cuda float64,float32,float16,bfloat16
    for dtype in float32 float16 bfloat16; do
        stage "bench_$dtype" 100 0 "$PYTHON" tools/analysis/benchmark_msda.py --device cuda \
            --dtype "$dtype" --shapes encoder decoder300 decoder900 --repeat "$BENCH_REPEAT" \
            --warmup 3 ${PEAK:+--peak-gbps "$PEAK"}
    done
    # Optional, while the budget lasts.
    stage racecheck 60 0 "$SANITIZER" --tool racecheck --error-exitcode 3 --print-limit 20 \
        "$PYTHON" "$WORK/small_case.py" cuda float32
    stage synccheck 45 0 "$SANITIZER" --tool synccheck --error-exitcode 3 --print-limit 20 \
        "$PYTHON" "$WORK/small_case.py" cuda float32
    stage int32 60 0 "$PYTHON" -m pytest -q -rs -p no:cacheprovider --runslow -k int32 \
        tests/test_ops/test_ms_deform_attn_cuda.py
    # At B=2 the float32 value (45 MB) fits in an H100 / H200 L2 (50 / 60 MB) and may stay there
    # between repeats (most of a decoder shape's compulsory bytes); at B=8 (182 MB) it cannot.
    stage bench_float32_b8 60 0 "$PYTHON" tools/analysis/benchmark_msda.py --device cuda \
        --dtype float32 --batch 8 --shapes encoder decoder300 --repeat "$BENCH_REPEAT" \
        --warmup 3 ${PEAK:+--peak-gbps "$PEAK"}
fi

# ---------------------------------------------------------------- report
device_state >"$WORK/state_after.txt"
"$PYTHON" "$WORK/report.py" "$WORK" "$OUTDIR" "$DRY_RUN" || say "report generation failed"
if ! cmp -s "$WORK/state_before.txt" "$WORK/state_after.txt"; then
    say "WARNING: device settings differ before/after (this script changes none): see report.md"
fi
# Required stages: env, build, probe, tests, memcheck, bench_*; optional ones may be skipped.
failed=$(awk -F'\t' '$2 != "passed" && $2 != "dry run" && !($2 == "skipped" &&
    ($1 == "racecheck" || $1 == "synccheck" || $1 == "int32" || $1 == "bench_float32_b8")) {
    print $1 }' "$STAGES" |
    sort -u | tr '\n' ' ')
if [ -n "$failed" ]; then
    say "FAILED stages: $failed(report: $OUTDIR/report.md)"
    exit 1
fi
say "all required stages passed (report: $OUTDIR/report.md)"
exit 0
