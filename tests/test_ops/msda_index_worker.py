"""Worker process of test_ms_deform_attn_index_fuzz.py: runs multi-scale deformable attention on
caller-chosen index tensors, one case per line, so that a crash (a segfault from an
out-of-bounds read) ends this process instead of pytest.

Protocol: prints ``ready`` once imported; then reads one JSON object per line::

    {"shapes": [[H, W], ...], "starts": [...], "num_value": S, "device": "cpu", "seed": 0}

and answers one JSON object per line, mapping each path (``forward``, ``backward``: the raw
``torch.ops.detrx`` ops; ``wrapper``: ``ms_deform_attn`` forward + backward; ``reference``:
``ms_deform_attn_pytorch``) to ``{"status": "ok", "error": max abs deviation from the
reference}`` or ``{"status": "raised", "type": ..., "message": ...}``.
"""
import json
import sys

import torch

from mmdet_detrx.ops import ms_deform_attn, ms_deform_attn_pytorch


def make_case(shapes, starts, num_value, device, seed):
    generator = torch.Generator().manual_seed(seed)
    levels = len(shapes)
    value = torch.randn(1, num_value, 1, 2, generator=generator, dtype=torch.float64)
    locations = torch.rand(1, 3, 1, levels, 2, 2, generator=generator,
                           dtype=torch.float64) * 1.2 - 0.1
    weights = torch.rand(1, 3, 1, levels, 2, generator=generator, dtype=torch.float64)
    grad_output = torch.randn(1, 3, 2, generator=generator, dtype=torch.float64)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64).reshape(levels, 2)
    level_start_index = torch.tensor(starts, dtype=torch.int64).reshape(levels)
    return [t.to(device) for t in (value, spatial_shapes, level_start_index, locations, weights,
                                   grad_output)]


def attempt(fn):
    try:
        return {'status': 'ok', 'result': fn()}
    except Exception as error:  # reported to the test, which decides what was expected
        return {'status': 'raised', 'type': type(error).__name__, 'message': str(error)}


def run_case(case):
    value, shapes, starts, locations, weights, grad_output = make_case(
        case['shapes'], case['starts'], case['num_value'], case['device'], case['seed'])

    def reference():
        leaves = [t.detach().requires_grad_() for t in (value, locations, weights)]
        out = ms_deform_attn_pytorch(leaves[0], shapes, leaves[1], leaves[2])
        return [out.detach()] + list(torch.autograd.grad(out, leaves, grad_output))

    def wrapper():
        leaves = [t.detach().requires_grad_() for t in (value, locations, weights)]
        out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2])
        return [out.detach()] + list(torch.autograd.grad(out, leaves, grad_output))

    def forward():
        return [torch.ops.detrx.ms_deform_attn_forward(value, shapes, starts, locations, weights,
                                                       64)]

    def backward():
        return list(torch.ops.detrx.ms_deform_attn_backward(value, shapes, starts, locations,
                                                            weights, grad_output, 64))

    results = {name: attempt(fn) for name, fn in
               (('reference', reference), ('wrapper', wrapper), ('forward', forward),
                ('backward', backward))}
    if case['device'] != 'cpu':
        torch.cuda.synchronize()  # surface asynchronous faults inside this case
    expected = results['reference'].get('result')
    for name, result in results.items():
        outputs = result.pop('result', None)
        if outputs is None:
            continue
        if expected is None:
            result['error'] = None  # ran although the reference refused: the test flags it
            continue
        reference_outputs = expected if name != 'backward' else expected[1:]
        result['error'] = max(float((a.cpu() - b.cpu()).abs().max()) if a.numel() else 0.0
                              for a, b in zip(outputs, reference_outputs))
    return results


def main():
    torch.set_num_threads(1)
    print('ready', flush=True)
    for line in sys.stdin:
        print(json.dumps(run_case(json.loads(line))), flush=True)


if __name__ == '__main__':
    main()
