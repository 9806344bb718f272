"""attention_inputs: mmcv's MultiheadAttention defaults, as ACT and MSDeformAttn rely on."""
import itertools

import pytest
import torch
from mmcv.cnn.bricks.transformer import MultiheadAttention

from mmdet_detrx.models.layers import attention_inputs

DIMS = 16


def mmcv_attention_through_the_helper(module, **inputs):
    """mmcv's MultiheadAttention output, recomputed from :func:`attention_inputs`."""
    query, key, value, identity = attention_inputs(batch_first=module.batch_first, **inputs)
    seq_first = (t.transpose(0, 1) for t in (query, key, value))  # what torch's MHA takes
    out = module.attn(*seq_first)[0]
    if module.batch_first:
        out = out.transpose(0, 1)
    return identity + module.dropout_layer(module.proj_drop(out))


@pytest.mark.parametrize('batch_first', [True, False])
@pytest.mark.parametrize('given', [
    set(names) for r in range(6)
    for names in itertools.combinations(('key', 'value', 'identity', 'query_pos', 'key_pos'), r)
])
def test_equals_mmcv_multihead_attention_for_every_omitted_argument(batch_first, given):
    torch.manual_seed(0)
    module = MultiheadAttention(DIMS, 4, batch_first=batch_first).eval()
    layout = (lambda n: (2, n, DIMS)) if batch_first else (lambda n: (n, 2, DIMS))
    # Key and value as long as the query, so mmcv's defaults (key = query, key_pos = query_pos)
    # give valid shapes whichever are omitted.
    inputs = {name: torch.randn(layout(7)) for name in given}
    query = torch.randn(layout(7))
    with torch.no_grad():
        expected = module(query, **inputs)
        actual = mmcv_attention_through_the_helper(module, query=query, **inputs)
    assert torch.equal(actual, expected)


def test_cross_attention_key_position_is_not_the_query_position():
    torch.manual_seed(0)
    module = MultiheadAttention(DIMS, 4, batch_first=True).eval()
    query, query_pos = torch.randn(2, 5, DIMS), torch.randn(2, 5, DIMS)
    key = torch.randn(2, 9, DIMS)
    _, positioned_key, value, _ = attention_inputs(query, key, query_pos=query_pos,
                                                   batch_first=True)
    assert positioned_key is key and value is key  # no key_pos of the key's shape: none added
    with torch.no_grad(), pytest.warns(UserWarning, match='position encoding of key'):
        expected = module(query, key, query_pos=query_pos)
        actual = mmcv_attention_through_the_helper(module, query=query, key=key,
                                                   query_pos=query_pos)
    assert torch.equal(actual, expected)


def test_without_a_key_value_defaults_to_the_query():
    query, query_pos, key = torch.randn(3, 2, DIMS), torch.randn(3, 2, DIMS), torch.randn(6, 2, 4)
    q, k, v, identity = attention_inputs(query, key, None, None, query_pos, query_pos,
                                         batch_first=False, uses_key=False)
    assert k is None and identity is query
    assert torch.equal(q, (query + query_pos).transpose(0, 1))
    assert torch.equal(v, query.transpose(0, 1))  # the raw query: no position on the value
