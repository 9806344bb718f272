"""Your COCO-format folder with your own classes: mmdet's ``CocoDataset``, checked on load.

mmdet's ``CocoDataset`` keeps the annotations of the categories named in ``metainfo.classes``
and drops the others without a word, and a missing image fails only when the sampler reaches it
(an iteration, an epoch, a checkpoint later). ``CocoFolderDataset`` is the same dataset (same
arguments, same samples) that refuses, when it is built (before the first iteration, before any
checkpoint), with the file and the key to fix:

* no ``metainfo=dict(classes=(...))`` (it would silently be COCO's 80 classes);
* a class of ``classes`` that no category of the annotation file has;
* an annotation whose category is not in ``classes``;
* an image listed in the annotation file that is not in the image folder.

Configs: ``configs/coco_folder/`` (README.md, "Your COCO folder").
"""
import os.path as osp
from typing import Iterable, List, Optional, Sequence

from mmdet.datasets import CocoDataset
from mmdet.registry import DATASETS
from mmengine.fileio import get_local_path

__all__ = ['CocoFolderDataset', 'CocoFolderError', 'check_coco_folder']

_SHOWN = 5


class CocoFolderError(ValueError):
    """A COCO-format folder that does not fit its config (see the message)."""


def _some(items: Sequence[str]) -> str:
    more = f', ... ({len(items) - _SHOWN} more)' if len(items) > _SHOWN else ''
    return ', '.join(items[:_SHOWN]) + more


def check_coco_folder(coco: dict, ann_file: str, classes: Optional[Iterable[str]],
                      img_dir: Optional[str], loader: Optional[str] = None) -> None:
    """Raise :class:`CocoFolderError` if the COCO json ``coco`` (the parsed ``ann_file``) does
    not fit ``classes`` or lists an image missing from ``img_dir`` (``None``: not checked, e.g.
    images behind a non-local backend). ``loader`` (``'train_dataloader'``) names the config
    entry in the messages."""
    key = f'{loader}.dataset' if loader else '<train|val|test>_dataloader.dataset'
    if not classes or isinstance(classes, str):
        raise CocoFolderError(
            f'{ann_file}: set your classes, the names of the categories to train on, with '
            f'{key}.metainfo=dict(classes=(...)) (without it they would be COCO\'s 80)')
    classes = list(classes)
    categories = {cat['id']: cat['name'] for cat in coco.get('categories', [])}
    unknown_classes = [name for name in classes if name not in categories.values()]
    if unknown_classes:
        raise CocoFolderError(
            f'{ann_file}: classes {unknown_classes} of {key}.metainfo.classes are not '
            f'categories of the file (it has {sorted(categories.values())})')
    images = {image['id']: image for image in coco.get('images', [])}
    for ann in coco.get('annotations', []):
        name = categories.get(ann.get('category_id'))
        if name not in classes:
            image = images.get(ann.get('image_id'), {})
            what = (f'category {name!r} (id {ann.get("category_id")})' if name is not None else
                    f'category id {ann.get("category_id")}, which the file does not define')
            raise CocoFolderError(
                f'{ann_file}: annotation {ann.get("id")} (image {image.get("file_name")!r}) has '
                f'{what}, which is not in {key}.metainfo.classes {classes}. Add it there, or '
                'remove those annotations from the file (mmdet\'s CocoDataset would drop them '
                'silently)')
    if img_dir is None:
        return
    missing: List[str] = [
        osp.join(img_dir, image['file_name']) for image in images.values()
        if not osp.isfile(osp.join(img_dir, image['file_name']))]
    if missing:
        raise CocoFolderError(
            f'{ann_file}: {len(missing)} of its images are missing: {_some(missing)}. Put them '
            f'there, or fix {key}.data_root / {key}.data_prefix.img')


@DATASETS.register_module()
class CocoFolderDataset(CocoDataset):
    """mmdet's ``CocoDataset`` for your own COCO-format folder and classes, refusing a folder
    that does not fit them (see the module docstring). Arguments are ``CocoDataset``'s; give
    ``metainfo=dict(classes=(...))``."""

    classes_required = True  # without metainfo.classes it refuses (not COCO's 80 by default)

    def __init__(self, *args, metainfo: Optional[dict] = None, **kwargs):
        self._classes_given = bool(metainfo and metainfo.get('classes'))
        super().__init__(*args, metainfo=metainfo, **kwargs)

    def load_data_list(self) -> List[dict]:
        with get_local_path(self.ann_file, backend_args=self.backend_args) as local_path:
            coco = self.COCOAPI(local_path)
        img_dir = self.data_prefix.get('img', '')
        local_images = self.backend_args is None and '://' not in img_dir
        check_coco_folder(coco.dataset, self.ann_file,
                          self.metainfo['classes'] if self._classes_given else None,
                          img_dir if local_images else None)
        api, self.COCOAPI = self.COCOAPI, lambda _: coco  # parsed once
        try:
            return super().load_data_list()
        finally:
            self.COCOAPI = api
