"""Image inputs of the analysis tools: one image file or every image in a folder."""
import os
import os.path as osp
from typing import List

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
