"""mmdet 3.3 DINO checkpoints load exactly into DINOX on OneDL's mmdetection 3.5.

DINO's decoder turns each reference box (cx, cy, w, h) into a sine encoding and feeds it to
``ref_point_head`` (an MLP). mmdet's ``coordinate_to_encoding(coord, num_feats)`` gives each
coordinate ``num_feats`` dims: ``num_feats / 2`` frequencies ``10000 ** (2j / num_feats)``, as
interleaved ``[sin, cos]`` pairs, the four blocks in the order y, x, w, h. mmdet 3.3 uses the
default ``num_feats=128`` (512 inputs, ``MLP(embed_dims * 2, ...)``: right for embed_dims 256
only); OneDL's mmdetection 3.5 (onedl-mmdetection issue #25) uses ``num_feats=embed_dims`` and
``MLP(embed_dims * 4, ...)``. So a checkpoint trained with mmdet 3.3 (mmdet's model zoo, ours)
fails a strict load there: ``decoder.ref_point_head.layers.0.weight`` is (256, 512) in the file
and (256, 1024) in the model.

The narrow encoding is a subset of the wide one: frequency ``k`` of mmdet 3.3 (``2k / 128``)
is frequency ``j = k * F / 128`` of the ``F = embed_dims`` one (``2j / F``). Input ``2k + s``
(``s``: 0 sin, 1 cos) of block ``b`` is therefore input ``b * F + 2 * k * F / 128 + s``. A 3.3
weight placed in those columns, zeros elsewhere, makes the first layer compute exactly what
mmdet 3.3's did. :func:`adapt_ref_point_head` installs that as a load-state-dict pre-hook on the
first linear layer (torch's and mmengine's loaders both run it); where the shapes already agree
(mmdet 3.3, or a checkpoint written on OneDL) it does nothing. The other direction (a OneDL
checkpoint into mmdet 3.3) is not exact and is not done.

mmdet 3.3 also builds ``ref_point_head`` wrong at any width but 256: it feeds the 512-wide encoding
into ``MLP(2 * embed_dims, ...)``, so DINO at 128 dims fails on its first forward.
:func:`fit_ref_point_head` gives the head the 512 inputs it is fed (the layout OneDL builds at 128
dims); where the sizes agree it does nothing.
"""
import torch
from mmdet.models.layers.transformer.utils import MLP
from torch import nn

__all__ = ['adapt_ref_point_head', 'expand_ref_point_weight', 'fit_ref_point_head']

MMDET33_FEATS = 128  # coordinate_to_encoding's num_feats in mmdet 3.3's DinoTransformerDecoder
_COORDS = 4  # cx, cy, w, h


def expand_ref_point_weight(weight: torch.Tensor, num_feats: int) -> torch.Tensor:
    """(out, 4 * 128) first-layer weight of mmdet 3.3 -> (out, 4 * num_feats), zeros elsewhere."""
    if num_feats % MMDET33_FEATS:
        raise ValueError(f'cannot place mmdet 3.3\'s DINO reference-point encoding (num_feats '
                         f'{MMDET33_FEATS}) into num_feats {num_feats}: not a multiple')
    ratio = num_feats // MMDET33_FEATS
    index = torch.arange(MMDET33_FEATS)  # one coordinate's block in mmdet 3.3
    frequency, phase = index // 2, index % 2  # k, s (0: sin, 1: cos)
    columns_in_block = 2 * frequency * ratio + phase  # (128, ) in a block of num_feats
    columns = torch.cat([block * num_feats + columns_in_block for block in range(_COORDS)])
    expanded = weight.new_zeros(weight.shape[0], _COORDS * num_feats)
    expanded[:, columns] = weight
    return expanded


def fit_ref_point_head(decoder: nn.Module) -> None:
    """Size mmdet 3.3's ``ref_point_head`` for the 4 * 128 inputs it is fed at any embed_dims."""
    head = decoder.ref_point_head
    first = head.layers[0]
    embed_dims = decoder.embed_dims
    mmdet33 = first.in_features == 2 * embed_dims  # OneDL: 4 * embed_dims
    if mmdet33 and first.in_features != _COORDS * MMDET33_FEATS:
        decoder.ref_point_head = MLP(_COORDS * MMDET33_FEATS, first.out_features,
                                     head.layers[-1].out_features, head.num_layers)


def adapt_ref_point_head(decoder: nn.Module) -> None:
    """Let ``decoder.ref_point_head`` (DINO) load mmdet 3.3's layout when its own is wider."""
    first = decoder.ref_point_head.layers[0]
    model_inputs = first.in_features
    if model_inputs == _COORDS * MMDET33_FEATS:  # mmdet 3.3's layout: nothing to adapt
        return
    num_feats = model_inputs // _COORDS

    def hook(module, state_dict, prefix, *args):
        key = prefix + 'weight'
        weight = state_dict.get(key)
        if (isinstance(weight, torch.Tensor) and weight.dim() == 2
                and weight.shape[1] == _COORDS * MMDET33_FEATS
                and weight.shape[0] == module.out_features):
            state_dict[key] = expand_ref_point_weight(weight, num_feats)

    first.register_load_state_dict_pre_hook(hook)
