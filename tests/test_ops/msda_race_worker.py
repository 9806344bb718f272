"""Worker process of test_ms_deform_attn_index_race.py: runs multi-scale deformable attention
while another thread keeps rewriting ``spatial_shapes`` / ``level_start_index`` in place, so that
a crash (an out-of-bounds read after a check passed on other values) ends this process rather
than pytest.

usage: python msda_race_worker.py SECONDS

The op releases the GIL while it runs, so the writer really runs between the input check and
the kernel. Every call must either succeed (its result may reflect either table), raise an
error naming an index argument, or (through autograd) autograd's error that a saved tensor was
modified in place. Prints one JSON line: counts per outcome and any other error.
"""
import json
import sys
import threading
import time

import torch

from mmdet_detrx.ops import ms_deform_attn

# Valid level table (S = 24 * 32 + 12 * 16 = 960 tokens) and tables that would make an
# unchecked kernel read far outside value: huge sizes, sizes whose product wraps, negatives.
VALID_SHAPES, VALID_STARTS = [[24, 32], [12, 16]], [0, 768]
BAD_TABLES = [([[2**20, 2**20], [12, 16]], [0, 2**40]),
              ([[2**32, 2**32], [24, 32]], [0, 0]),
              ([[24, 32], [12, 16]], [0, 2**40]),
              ([[-24, 32], [12, 16]], [0, -768]),
              ([[24, 32], [1200, 1600]], [0, 768])]


def main():
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    value = torch.randn(1, 960, 2, 8, generator=generator, requires_grad=True)
    locations = torch.rand(1, 64, 2, 2, 4, 2, generator=generator, requires_grad=True)
    weights = torch.rand(1, 64, 2, 2, 4, generator=generator, requires_grad=True)
    shapes = torch.tensor(VALID_SHAPES)
    starts = torch.tensor(VALID_STARTS)
    grad_output = torch.ones(1, 64, 16)
    valid = (torch.tensor(VALID_SHAPES), torch.tensor(VALID_STARTS))
    bad = [(torch.tensor(s), torch.tensor(i)) for s, i in BAD_TABLES]

    stop = threading.Event()

    def writer():
        step = 0
        while not stop.is_set():
            table = valid if step % 2 == 0 else bad[(step // 2) % len(bad)]
            shapes.copy_(table[0])  # in place, releasing the GIL like the op does
            starts.copy_(table[1])
            step += 1

    # 'stale': autograd's own error when the saved index tensors changed between forward and
    # backward (their version counter moved), a clear refusal as well.
    counts = {'ok': 0, 'rejected': 0, 'stale': 0}
    unexpected = []
    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    deadline = time.monotonic() + seconds
    calls = [
        ('forward', lambda: torch.ops.detrx.ms_deform_attn_forward(
            value.detach(), shapes, starts, locations.detach(), weights.detach(), 64)),
        ('backward', lambda: torch.ops.detrx.ms_deform_attn_backward(
            value.detach(), shapes, starts, locations.detach(), weights.detach(), grad_output,
            64)),
        ('wrapper', lambda: torch.autograd.grad(
            ms_deform_attn(value, shapes, starts, locations, weights).sum(),
            (value, locations, weights))),
    ]
    while time.monotonic() < deadline:
        for name, call in calls:
            try:
                call()
                counts['ok'] += 1
            except Exception as error:  # noqa: BLE001  (classified below)
                message = str(error)
                if 'spatial_shapes' in message or 'level_start_index' in message:
                    counts['rejected'] += 1
                elif 'modified by an inplace operation' in message:
                    counts['stale'] += 1
                else:
                    unexpected.append(f'{name}: {type(error).__name__}: {message[:300]}')
    stop.set()
    thread.join()
    print(json.dumps({'counts': counts, 'unexpected': unexpected[:5]}), flush=True)


if __name__ == '__main__':
    main()
