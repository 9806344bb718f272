"""The registry of checkpoint layouts and what a layout hands back.

A *layout* is one source format (HF transformers' DETR, facebookresearch/detr's ``.pth``, ...):
it says how well a loaded :class:`Source` matches it (:meth:`Layout.match`) and turns a matching
source into our detector's weights plus the config facts needed to run them
(:meth:`Layout.convert` -> :class:`Converted`). Everything shared -- reading the source, writing
the checkpoint and the config, the strict load check -- lives in :mod:`._convert` and
:mod:`._source`, so a layout file is a table of key rules and one function.

Register a layout by decorating its class (one instance is registered under ``name``)::

    @register_layout
    class MyLayout(KeyPatternLayout):
        name = 'my-format'
        description = 'what it reads'
        key_patterns = (r'backbone\\..*', r'transformer\\..*')   # every source key must match one
        required_keys = (r'transformer\\.level_embed',)          # keys that tell it from others

        def convert(self, source):
            state_dict, unmatched = apply_key_rules(source.state_dict, RULES)
            ...
            return Converted(state_dict=..., base_config='mmdet::...', model=dict(...),
                             classes=[...], mean=[...], std=[...])
"""
import difflib
import re
from dataclasses import dataclass, field
from typing import (Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple,
                    Union)

import torch

__all__ = [
    'ConversionError', 'Source', 'Converted', 'LayoutMatch', 'Layout', 'KeyPatternLayout',
    'register_layout', 'register_source_check', 'get_layout', 'list_layouts', 'detect_layout',
    'check_source', 'apply_key_rules',
    'match_key_patterns', 'IMAGENET_MEAN_255', 'IMAGENET_STD_255'
]

# torchvision/HF ImageNet statistics on mmdet's 0-255 pixel scale.
IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)


class ConversionError(ValueError):
    """A source that cannot be converted: the message says what is wrong and what to do."""


@dataclass
class Source:
    """A loaded checkpoint: a file (``.pth``/``.bin``/``.safetensors``) or an HF folder.

    ``state_dict`` holds the weights under the names the source stores them (a file's
    ``model``/``state_dict`` entry unwrapped); ``checkpoint`` the whole loaded object of a file
    (original repositories keep their ``args`` there); ``hf_config`` / ``preprocessor_config``
    an HF folder's ``config.json`` / ``preprocessor_config.json``.
    """
    path: str
    state_dict: Dict[str, torch.Tensor]
    checkpoint: Any = None
    hf_config: Optional[dict] = None
    preprocessor_config: Optional[dict] = None

    @property
    def is_hf_folder(self) -> bool:
        return self.hf_config is not None


@dataclass
class Converted:
    """What a layout returns: our weights and the facts the written config needs.

    * ``state_dict``: keys of our detector (it is loaded strictly before anything is written).
    * ``base_config``: the config the written one bases on (``'mmdet::detr/...py'`` or a shipped
      config name such as ``'deformable_detr/deformable-detrx_r50_16xb2-50e_coco.py'``).
    * ``model``: overrides of the base's ``model`` (mmengine merge rules, ``_delete_`` allowed):
      the detector type, the source's hyper-parameters; ``num_classes`` and the normalisation
      are added by the writer from ``classes`` / ``mean`` / ``std``.
    * ``classes``: class names in the order of the classifier's outputs (no background).
    * ``mean``/``std``/``bgr_to_rgb``: the source's normalisation on mmdet's 0-255 scale.
    * ``notes``: what the user should know -- dropped and re-initialised keys by name, options
      taken from defaults; printed by the tool and stored in the checkpoint's ``meta``.
    * ``config``: other top-level config entries (rarely needed).
    """
    state_dict: Dict[str, torch.Tensor]
    base_config: str
    model: dict
    classes: Sequence[str]
    mean: Sequence[float] = IMAGENET_MEAN_255
    std: Sequence[float] = IMAGENET_STD_255
    bgr_to_rgb: bool = True
    notes: List[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)


@dataclass
class LayoutMatch:
    """How well a source matches a layout: ``score`` 1.0 is a full match; ``unmatched`` lists
    the source keys the layout does not know and ``reason`` any other mismatch."""
    score: float
    unmatched: List[str] = field(default_factory=list)
    reason: Optional[str] = None

    @property
    def full(self) -> bool:
        return self.score >= 1.0 and not self.unmatched and self.reason is None


class Layout:
    """One source format. Subclass, set ``name``/``description``, implement both methods.

    A layout may also define ``match_when_named(source)``: used instead of ``match`` when the
    user names the layout (``layout=``/``--from``), for sources detection must not pick because
    another layout has the same keys (DETR-R50 vs DETR-R50-DC5 weights).
    """
    name: str = ''
    description: str = ''

    def match(self, source: Source) -> LayoutMatch:
        raise NotImplementedError

    def convert(self, source: Source) -> Converted:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f'<layout {self.name}>'


def match_key_patterns(keys: Iterable[str], patterns: Sequence[str],
                       required: Sequence[str] = ()) -> LayoutMatch:
    """Score ``keys`` against regexes: the share of keys that fully match one of ``patterns``;
    a ``required`` regex no key matches caps the score below 1 and is named in ``reason``."""
    keys = list(keys)
    compiled = [re.compile(p) for p in patterns]
    unmatched = [k for k in keys if not any(p.fullmatch(k) for p in compiled)]
    score = 1.0 - len(unmatched) / max(len(keys), 1)
    missing = [r for r in required if not any(re.fullmatch(r, k) for k in keys)]
    reason = None
    if missing:
        score = min(score, 0.99) * (1 - 0.1 * len(missing) / len(required))
        reason = 'no key matches ' + ', '.join(repr(r) for r in missing)
    return LayoutMatch(score=score, unmatched=unmatched, reason=reason)


class KeyPatternLayout(Layout):
    """A layout recognised by its key names: ``key_patterns`` must cover every key of the
    source and each of ``required_keys`` must match at least one."""
    key_patterns: Sequence[str] = ()
    required_keys: Sequence[str] = ()

    def match(self, source: Source) -> LayoutMatch:
        return match_key_patterns(source.state_dict, self.key_patterns, self.required_keys)


Rule = Tuple[str, Union[str, Callable[[re.Match], str], None]]


def apply_key_rules(state_dict: Mapping[str, torch.Tensor], rules: Sequence[Rule]
                    ) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Rename keys by the first rule whose regex fully matches: ``(regex, template)`` where the
    template uses ``\\1``-style groups (``re.Match.expand``), is a function of the match, or is
    ``None`` to drop the key on purpose. Returns the renamed dict and the keys no rule matched,
    in source order. Two source keys landing on one name is an error (a wrong table)."""
    compiled = [(re.compile(pattern), template) for pattern, template in rules]
    out: Dict[str, torch.Tensor] = {}
    origin: Dict[str, str] = {}
    unmatched: List[str] = []
    for key, value in state_dict.items():
        for pattern, template in compiled:
            match = pattern.fullmatch(key)
            if match is None:
                continue
            if template is None:
                break
            new_key = template(match) if callable(template) else match.expand(template)
            if new_key in out:
                raise ConversionError(f'key rules map both {origin[new_key]!r} and {key!r} to '
                                      f'{new_key!r}')
            out[new_key] = value
            origin[new_key] = key
            break
        else:
            unmatched.append(key)
    return out, unmatched


_LAYOUTS: Dict[str, Layout] = {}
_SOURCE_CHECKS: List[Callable[[Source], None]] = []


def register_source_check(check: Callable[[Source], None]):
    """Register ``check(source)``, run on every source before detection; it raises a
    :class:`ConversionError` for a source it recognises as unsupported (e.g. an HF folder of an
    architecture no layout handles), so the user hears the real reason, not 'no layout'."""
    _SOURCE_CHECKS.append(check)
    return check


def check_source(source: Source) -> None:
    for check in _SOURCE_CHECKS:
        check(source)


def register_layout(layout):
    """Register a :class:`Layout` subclass (decorator; one instance) or instance by its name."""
    instance = layout() if isinstance(layout, type) else layout
    if not isinstance(instance, Layout) or not instance.name:
        raise TypeError(f'{layout!r} is not a named Layout')
    if instance.name in _LAYOUTS and type(_LAYOUTS[instance.name]) is not type(instance):
        raise KeyError(f'layout {instance.name!r} is already registered by '
                       f'{type(_LAYOUTS[instance.name]).__module__}')
    _LAYOUTS[instance.name] = instance
    return layout


def list_layouts() -> List[str]:
    return sorted(_LAYOUTS)


def get_layout(name: str) -> Layout:
    try:
        return _LAYOUTS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_LAYOUTS), n=3, cutoff=0.4)
        hint = f'; did you mean {" or ".join(close)}?' if close else ''
        raise ConversionError(f'unknown layout {name!r}{hint} (known: '
                              f'{", ".join(list_layouts())})') from None


def _first(keys: Sequence[str], count: int = 8) -> str:
    shown = ', '.join(keys[:count])
    return shown + (f', ... ({len(keys)} in all)' if len(keys) > count else '')


def detect_layout(source: Source) -> Layout:
    """The one registered layout that fully matches ``source``; otherwise a
    :class:`ConversionError` naming the closest layout and its first unmatched keys."""
    if not _LAYOUTS:
        raise ConversionError('no checkpoint layouts are registered')
    matches = {name: layout.match(source) for name, layout in _LAYOUTS.items()}
    full = [name for name, m in matches.items() if m.full]
    if len(full) == 1:
        return _LAYOUTS[full[0]]
    if len(full) > 1:
        raise ConversionError(f'{source.path} matches several layouts ({", ".join(full)}): '
                              'choose one with layout=... (--from on the command line)')
    best = max(matches, key=lambda name: matches[name].score)
    m = matches[best]
    what = []
    if m.unmatched:
        what.append(f'{len(m.unmatched)} of its {len(source.state_dict)} keys match no rule of '
                    f'{best!r}, first: {_first(m.unmatched)}')
    if m.reason:
        what.append(m.reason)
    raise ConversionError(
        f'{source.path} matches no known checkpoint layout. Closest: {best!r} '
        f'({_LAYOUTS[best].description}; {m.score:.0%} of the keys): ' + '; '.join(what)
        + f'. Known layouts: {", ".join(list_layouts())}.')
