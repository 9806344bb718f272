"""The input defaults of mmcv's attention modules, for layers that replace their computation.

mmcv's ``MultiheadAttention.forward`` fills in omitted arguments before attending: ``key``
defaults to ``query``, ``value`` to ``key``, ``identity`` (the residual) to ``query``,
``key_pos`` to ``query_pos`` when it has the key's shape; positions are added to the query and
the key, never to the value; ``batch_first=False`` inputs are ``(N, B, C)``.
``MultiScaleDeformableAttention.forward`` does the same without a key (it ignores ``key``, so
``value`` defaults to ``query``). :func:`attention_inputs` does exactly that, so the layers
that keep mmcv's call but compute the attention themselves (ACT, our deformable attention)
state the contract once.
"""
from typing import Optional, Tuple

from torch import Tensor

__all__ = ['attention_inputs']


def attention_inputs(query: Tensor,
                     key: Optional[Tensor] = None,
                     value: Optional[Tensor] = None,
                     identity: Optional[Tensor] = None,
                     query_pos: Optional[Tensor] = None,
                     key_pos: Optional[Tensor] = None,
                     batch_first: bool = False,
                     uses_key: bool = True
                     ) -> Tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """mmcv's attention defaults applied; query, key and value returned batch first.

    Args:
        query, key, value, identity, query_pos, key_pos, batch_first: as in mmcv's
            ``MultiheadAttention.forward``.
        uses_key (bool): False for a layer without a key (mmcv's deformable attention):
            ``key`` and ``key_pos`` are ignored, ``value`` defaults to ``query`` and the
            returned key is None.

    Returns:
        tuple: ``(query, key, value, identity)``: query ``(B, N, C)`` and key ``(B, S, C)``
        with their positions added, value ``(B, S, C)`` without, identity as given or
        ``query`` (in the caller's layout, for the residual).
    """
    if uses_key:
        key = query if key is None else key
        if key_pos is None and query_pos is not None and query_pos.shape == key.shape:
            key_pos = query_pos
    else:
        key = key_pos = None
    value = (query if key is None else key) if value is None else value
    identity = query if identity is None else identity
    if query_pos is not None:
        query = query + query_pos
    if key_pos is not None:
        key = key + key_pos
    if not batch_first:
        query, value = query.transpose(0, 1), value.transpose(0, 1)  # (B, N|S, C)
        key = None if key is None else key.transpose(0, 1)
    return query, key, value, identity
