"""Image inputs of the analysis tools (one image file or every image in a folder) and the names
of the pictures they write (:func:`output_names`: never two outputs for one name)."""
import os
import os.path as osp
from typing import List

__all__ = ['IMAGE_EXTENSIONS', 'list_images', 'output_names']

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


def list_images(path: str) -> List[str]:
    """``[path]`` for an image file, the sorted images of a folder, or a clear error."""
    if osp.isdir(path):
        images = sorted(osp.join(path, name) for name in os.listdir(path)
                        if name.lower().endswith(IMAGE_EXTENSIONS))
        if not images:
            raise FileNotFoundError(f'no images in {path}')
        return images
    if not osp.isfile(path):
        raise FileNotFoundError(f'image {path} does not exist')
    return [path]


def output_names(paths: List[str], suffix: str = '', ext: str = '.png') -> List[str]:
    """One distinct output file name per input image, for tools that write a picture each.

    ``a.png`` -> ``a{suffix}{ext}``. Inputs whose names would clash keep more of themselves: the
    extension when only it differs (``a.png``, ``a.jpg`` -> ``a_png...``, ``a_jpg...``), then a
    running number for the same file name in different folders. Names are compared
    case-insensitively (a case-insensitive file system would clash them too).
    """
    stems = [osp.splitext(osp.basename(p))[0] for p in paths]
    counts = {}
    for stem in stems:
        counts[stem.lower()] = counts.get(stem.lower(), 0) + 1
    names = []
    for path, stem in zip(paths, stems):
        if counts[stem.lower()] > 1:
            stem = f'{stem}_{osp.splitext(path)[1].lstrip(".")}'
        names.append(stem)
    used, unique = set(), []
    for name in names:
        candidate, number = name, 0
        while candidate.lower() in used:
            number += 1
            candidate = f'{name}_{number}'
        used.add(candidate.lower())
        unique.append(f'{candidate}{suffix}{ext}')
    return unique
