"""Which parameters of a detector depend on its class count, per head type: one table.

Fine-tuning a checkpoint to another class set (a COCO model to your 2 classes) must re-initialise
exactly these and load everything else. Each row names a head type and the detector's
state-dict keys (regular expressions, matched in full) whose first dimension counts classes:

* ``DETRHead`` (DETR; ``ConditionalDETRHead`` inherits the row): ``bbox_head.fc_cls``, with
  ``num_classes + 1`` rows for DETR's softmax and ``num_classes`` for Conditional DETR's sigmoid.
  MTKD's act and full branches run the same head, so this row covers both.
* ``DeformableDETRHead``: every ``bbox_head.cls_branches.N``, one per decoder layer plus, with
  ``as_two_stage``, the encoder's proposal branch (the last one).
* ``DINOHead``: its ``cls_branches.N`` (the encoder's included) and the denoising queries' label
  embedding, ``dn_query_generator.label_embedding`` (``num_classes`` rows).

An auxiliary dense head trained beside the DETR head (``aux_head`` of
:class:`~mmdet_detrx.models.detectors.DINOXAux`) adds its own rows, relative to ``aux_head.``:

* ``AnchorFreeHead`` (FCOS and its relatives): ``conv_cls`` (``num_classes`` output channels).

A head type is looked up along its class hierarchy (first row found wins), so a subclass of a
supported head is supported. :func:`find_class_change` decides whether a checkpoint differs from
a model by exactly that set, consistently in one class count.
"""
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

__all__ = ['CLASS_DEPENDENT_PARAMS', 'AUX_HEAD_CLASS_DEPENDENT_PARAMS', 'ClassChange',
           'class_dependent_keys', 'find_class_change']

_CLS_BRANCHES = r'bbox_head\.cls_branches\.\d+\.(weight|bias)'

CLASS_DEPENDENT_PARAMS: Dict[str, Tuple[str, ...]] = {
    'DETRHead': (r'bbox_head\.fc_cls\.(weight|bias)', ),
    'DeformableDETRHead': (_CLS_BRANCHES, ),
    'DINOHead': (_CLS_BRANCHES, r'dn_query_generator\.label_embedding\.weight'),
}

# Auxiliary dense heads: patterns relative to the head's attribute (``AUX_HEADS``).
AUX_HEAD_CLASS_DEPENDENT_PARAMS: Dict[str, Tuple[str, ...]] = {
    'AnchorFreeHead': (r'conv_cls\.(weight|bias)', ),
}
AUX_HEADS = ('aux_head', )


def _row(head: Optional[nn.Module], table: Dict[str, Tuple[str, ...]]) -> Tuple[str, ...]:
    for cls in type(head).__mro__ if head is not None else ():
        if cls.__name__ in table:
            return table[cls.__name__]
    return ()


def _head_patterns(detector: nn.Module) -> Tuple[str, ...]:
    patterns = _row(getattr(detector, 'bbox_head', None), CLASS_DEPENDENT_PARAMS)
    if not patterns:  # a DETR head we do not know: nothing is class-dependent
        return ()
    for name in AUX_HEADS:
        aux = _row(getattr(detector, name, None), AUX_HEAD_CLASS_DEPENDENT_PARAMS)
        patterns += tuple(re.escape(name + '.') + pattern for pattern in aux)
    return patterns


def class_dependent_keys(detector: nn.Module) -> List[str]:
    """The detector's state-dict keys whose first dimension counts classes (table above);
    empty for a head type the table does not know."""
    patterns = _head_patterns(detector)
    compiled = [re.compile(pattern) for pattern in patterns]
    return [key for key in detector.state_dict()
            if any(pattern.fullmatch(key) for pattern in compiled)]


@dataclass
class ClassChange:
    """A checkpoint that differs from the model only in its class count."""
    checkpoint_classes: int
    model_classes: int
    keys: List[str]  # the class-dependent keys, all of which differ

    def describe(self) -> str:
        return (f'fine-tuning from {self.checkpoint_classes} to {self.model_classes} classes: '
                f're-initialised {len(self.keys)} class-dependent parameters '
                f'({", ".join(self.keys)}); everything else loaded from the checkpoint')


def find_class_change(detector: nn.Module, mismatched: Mapping[str, torch.Size],
                      model_state: Optional[Mapping[str, torch.Tensor]] = None
                      ) -> Optional[ClassChange]:
    """The :class:`ClassChange` when the shape-mismatched keys are exactly the detector's
    class-dependent ones, each differing only in its first dimension by one and the same class
    count; else ``None``.

    Args:
        detector: the model (unwrapped), with its ``bbox_head``.
        mismatched: key -> the checkpoint tensor's shape, for every key whose shape differs
            from the model's.
        model_state: the detector's state dict, if already at hand.
    """
    keys = class_dependent_keys(detector)
    if not keys or set(mismatched) != set(keys):
        return None
    model_classes = int(detector.bbox_head.num_classes)
    model_state = detector.state_dict() if model_state is None else model_state
    checkpoint_classes = set()
    for key in keys:
        model_shape, checkpoint_shape = tuple(model_state[key].shape), tuple(mismatched[key])
        if len(model_shape) != len(checkpoint_shape) or model_shape[1:] != checkpoint_shape[1:]:
            return None
        # DETR's softmax fc_cls has a background row (num_classes + 1): keep the same offset.
        checkpoint_classes.add(checkpoint_shape[0] - (model_shape[0] - model_classes))
    if len(checkpoint_classes) != 1 or min(checkpoint_classes) < 1:
        return None
    return ClassChange(checkpoint_classes.pop(), model_classes, keys)

