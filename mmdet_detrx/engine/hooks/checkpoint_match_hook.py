"""Refuse a checkpoint whose weights do not match the model, before they are loaded.

mmengine's ``Runner.load_checkpoint`` (``load_from``, ``--resume``, ``tools/test.py``'s
checkpoint) loads with ``strict=False``: an empty or unrelated ``state_dict`` only logs "missing
keys" and the run continues from random weights (a test reports their mAP, exit status 0).
``CheckpointMatchHook`` runs at mmengine's ``after_load_checkpoint`` extension point, compares
the checkpoint's ``state_dict`` (after mmengine's own ``^module.`` key revision) with the model's,
and raises listing the missing, unexpected and shape-mismatched keys. The comparison runs through
the modules' own ``_load_from_state_dict`` (a module that completes a state dict itself, like
``E2LSH`` with its seeded hash buffers, matches a checkpoint without them).

Tolerated, as mmengine's ``load_state_dict`` also tolerates them: missing ``num_batches_tracked``
BatchNorm counters (absent from pre-0.4.1 checkpoints); plus any key matching one of
``ignore_keys`` (regular expressions, ``re.search``). Our tools add this hook unless
``--allow-partial-load`` is given; with mmdet's tools add it in the config::

    custom_hooks = [dict(type='CheckpointMatchHook')]

Fine-tuning to another class set: when training from ``load_from`` (not resuming), a checkpoint
that differs from the model exactly in the class-dependent parameters of its head
(``mmdet_detrx.models.class_dependent``: ``fc_cls``, every ``cls_branches.N``, DINO's
``dn_query_generator.label_embedding``), all in one other class count, is accepted: those keep
the model's initialisation, everything else loads strictly, and one log line lists them. Any
other mismatch, and a class change when testing or resuming, is still refused.
"""
import re
from collections import OrderedDict
from typing import Optional, Sequence

from mmdet.registry import HOOKS
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import BaseTTAModel, is_model_wrapper
from mmengine.runner import BaseLoop

from mmdet_detrx.models.class_dependent import find_class_change

__all__ = ['CheckpointMatchHook', 'CheckpointMismatchError']

_SHOWN = 20  # keys listed per category; the counts are always complete


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's state_dict does not fit the model (see the message for the keys)."""


def _listing(title: str, keys: Sequence[str]) -> str:
    shown = ', '.join(keys[:_SHOWN])
    more = f', ... ({len(keys) - _SHOWN} more)' if len(keys) > _SHOWN else ''
    return f'{len(keys)} {title}: {shown}{more}'


@HOOKS.register_module()
class CheckpointMatchHook(Hook):
    """Raise :class:`CheckpointMismatchError` when a loaded checkpoint does not fit the model.

    Args:
        ignore_keys (Sequence[str]): regular expressions of state-dict keys that may be missing
            from, or unexpected in, the checkpoint. Default: none.
        revise_keys (Sequence[tuple]): ``(pattern, replacement)`` applied to checkpoint keys
            first, as mmengine's ``Runner.load_checkpoint`` does. Default ``[('^module.', '')]``.
        allow_class_change (bool, optional): accept a checkpoint of another class count (see
            the module docstring). ``None`` (default): when fine-tuning, i.e. the runner trains
            from ``load_from`` without resuming; never when testing, validating or resuming.
    """

    priority = 'VERY_LOW'  # after hooks that rewrite the checkpoint in after_load_checkpoint

    def __init__(self, ignore_keys: Sequence[str] = (),
                 revise_keys: Sequence[tuple] = ((r'^module.', ''), ),
                 allow_class_change: Optional[bool] = None):
        self.allow_class_change = allow_class_change
        if isinstance(ignore_keys, str):
            ignore_keys = [ignore_keys]
        self.ignore_keys = [re.compile(pattern) for pattern in ignore_keys]
        self.revise_keys = [(re.compile(p), r) for p, r in revise_keys]

    def _ignored(self, key: str) -> bool:
        return any(pattern.search(key) for pattern in self.ignore_keys)

    def _fine_tuning(self, runner) -> bool:
        """Whether a class change may be accepted: the runner is training (its train loop is
        built, as ``Runner.train`` does before loading) and not resuming."""
        if self.allow_class_change is not None:
            return self.allow_class_change
        return (isinstance(getattr(runner, '_train_loop', None), BaseLoop)
                and not getattr(runner, '_resume', False))

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        state_dict = checkpoint.get('state_dict', checkpoint) if isinstance(
            checkpoint, dict) else checkpoint
        if not isinstance(state_dict, dict):
            raise CheckpointMismatchError(
                f'the checkpoint holds a {type(state_dict).__name__}, not a state_dict')
        metadata = getattr(state_dict, '_metadata', None)
        revised, original_keys = OrderedDict(), {}
        for original_key, value in state_dict.items():
            key = str(original_key)
            for pattern, replacement in self.revise_keys:
                key = pattern.sub(replacement, key)
            revised[key] = value
            original_keys[key] = original_key
        if metadata is not None:
            revised._metadata = metadata
        model = runner.model
        while is_model_wrapper(model) or isinstance(model, BaseTTAModel):  # as mmengine loads
            model = model.module
        num_model_keys = len(model.state_dict())

        # Compare through the modules' own loading code (as mmengine's loader does next), so a
        # module that completes a state dict itself (E2LSH's seeded hash buffers, BatchNorm's
        # counter of old checkpoints) counts as matching. Loading now is what the runner does
        # right after this hook; a mismatch raises before anything runs on the weights.
        mismatched = {}  # key -> torch's message
        try:
            result = model.load_state_dict(revised, strict=False)
        except RuntimeError as error:  # shape mismatches: torch lists them all, then raises
            for line in str(error).splitlines()[1:]:
                found = re.match(r'\s*size mismatch for (\S+): (.*)', line)
                if not found:
                    raise
                mismatched[found.group(1)] = found.group(2).rstrip('.')
            result = model.load_state_dict(
                OrderedDict((k, v) for k, v in revised.items() if k not in mismatched),
                strict=False)
        missing = [key for key in result.missing_keys if key not in mismatched
                   and not self._ignored(key) and not key.endswith('num_batches_tracked')]
        unexpected = [key for key in result.unexpected_keys if not self._ignored(key)]
        class_change = None
        if mismatched and not (missing or unexpected):
            model_state = model.state_dict()
            class_change = find_class_change(
                model, {key: revised[key].shape for key in mismatched}, model_state)
            if class_change is not None and self._fine_tuning(runner):
                # The model keeps its initialisation there; the checkpoint is given the same
                # tensors, so mmengine's loader (next) loads them without size warnings.
                for key in class_change.keys:
                    state_dict[original_keys[key]] = model_state[key].detach().clone()
                print_log(class_change.describe(), logger='current')
                return
        mismatched = [f'{key} ({message})' for key, message in mismatched.items()
                      if not self._ignored(key)]
        if not (missing or unexpected or mismatched):
            return
        parts = [_listing(title, keys) for title, keys in (
            ('missing keys (in the model, not in the checkpoint)', missing),
            ('unexpected keys (in the checkpoint, not in the model)', unexpected),
            ('shape mismatches', mismatched)) if keys]
        if class_change is not None:
            raise CheckpointMismatchError(
                f'the checkpoint has {class_change.checkpoint_classes} classes and the model '
                f'{class_change.model_classes} (model.bbox_head.num_classes): '
                + '; '.join(parts) + '. Only fine-tuning (training from load_from, not '
                'resuming) re-initialises those parameters; to test or resume, use a '
                'checkpoint trained for this class set, or set model.bbox_head.num_classes to '
                f'{class_change.checkpoint_classes} and the dataset classes to match.')
        raise CheckpointMismatchError(
            f'the checkpoint does not match the model ({num_model_keys} keys in the model, '
            f'{len(revised)} in the checkpoint): ' + '; '.join(parts) + '. Evaluating or '
            'resuming from it would run partly random weights. If a partial load is intended '
            '(e.g. fine-tuning with a head of another structure; another class count alone '
            'needs no flag), pass --allow-partial-load to tools/train.py or tools/test.py, or '
            'list the keys in CheckpointMatchHook(ignore_keys=[...]).')
