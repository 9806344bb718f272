"""Read a checkpoint file or an HF ``save_pretrained``/hub-snapshot folder into a :class:`Source`.

Files: ``.safetensors`` (read without the ``safetensors`` package if it is missing: the format is
a JSON header and raw little-endian tensors) or torch pickles, loaded with the package's safe
loader (``weights_only``; a pickle that needs arbitrary globals is refused with the reason, see
``mmdet_detrx.utils.safe_checkpoint``). A file's ``state_dict`` (mmengine) or ``model`` (the
original DETR repositories, detrex) entry is unwrapped.

Folders: ``config.json`` plus ``model.safetensors``, sharded ``model-*.safetensors`` with their
index, or ``pytorch_model.bin``; ``preprocessor_config.json`` when present.
"""
import json
import os
import os.path as osp
import struct
from typing import Dict, Optional

import torch

from ._registry import ConversionError, Source

__all__ = ['load_source', 'read_safetensors', 'write_safetensors']

_SAFETENSORS_DTYPES = {
    'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
    'I64': torch.int64, 'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8,
    'U8': torch.uint8, 'BOOL': torch.bool
}


def read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file (the ``safetensors`` package when installed)."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        load_file = None
    if load_file is not None:
        return load_file(path)
    with open(path, 'rb') as f:
        data = f.read()
    (header_len, ) = struct.unpack('<Q', data[:8])
    header = json.loads(data[8:8 + header_len])
    header.pop('__metadata__', None)
    body = memoryview(data)[8 + header_len:]
    out = {}
    for name, info in header.items():
        start, end = info['data_offsets']
        dtype = _SAFETENSORS_DTYPES[info['dtype']]
        buffer = bytearray(body[start:end])
        tensor = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
        out[name] = tensor.reshape(info['shape'])
    return out


def write_safetensors(tensors: Dict[str, torch.Tensor], metadata: Optional[dict] = None) -> bytes:
    """The bytes of a ``.safetensors`` file holding ``tensors`` (contiguous copies)."""
    names = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        raw = tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b''
        header[name] = dict(dtype=names[tensor.dtype], shape=list(tensor.shape),
                            data_offsets=[offset, offset + len(raw)])
        chunks.append(raw)
        offset += len(raw)
    if metadata:
        header['__metadata__'] = {str(k): str(v) for k, v in metadata.items()}
    encoded = json.dumps(header, separators=(',', ':')).encode()
    encoded += b' ' * (-len(encoded) % 8)  # tensors start 8-byte aligned
    return struct.pack('<Q', len(encoded)) + encoded + b''.join(chunks)


def _read_json(path: str) -> Optional[dict]:
    if not osp.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _folder_weights(folder: str) -> Dict[str, torch.Tensor]:
    single = osp.join(folder, 'model.safetensors')
    if osp.isfile(single):
        return read_safetensors(single)
    index = _read_json(osp.join(folder, 'model.safetensors.index.json'))
    if index is not None:
        state_dict = {}
        for shard in sorted(set(index['weight_map'].values())):
            state_dict.update(read_safetensors(osp.join(folder, shard)))
        return state_dict
    pickled = osp.join(folder, 'pytorch_model.bin')
    if osp.isfile(pickled):
        return _load_torch_file(pickled)
    raise ConversionError(
        f'{folder} has a config.json but no weights: expected model.safetensors, '
        'model.safetensors.index.json with its shards, or pytorch_model.bin')


def _load_torch_file(path: str):
    from mmdet_detrx.utils.safe_checkpoint import load_checkpoint_file
    return load_checkpoint_file(path, map_location='cpu')


def _unwrap(checkpoint) -> Dict[str, torch.Tensor]:
    state_dict = checkpoint
    for key in ('state_dict', 'model', 'module'):
        if isinstance(state_dict, dict) and isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
    if not isinstance(state_dict, dict) or not state_dict:
        raise ConversionError('the checkpoint holds no state dict (a dict of tensors, or one '
                              "under 'state_dict'/'model')")
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ConversionError('the checkpoint holds no tensors')
    return tensors


def load_source(src: str) -> Source:
    """Load ``src`` (a checkpoint file or an HF folder) for layout detection and conversion."""
    src = os.fspath(src)
    if osp.isdir(src):
        config = _read_json(osp.join(src, 'config.json'))
        if config is None:
            raise ConversionError(
                f'{src} is a folder without config.json: give a checkpoint file, or an HF '
                'save_pretrained / hub snapshot folder (config.json + model.safetensors)')
        return Source(path=src, state_dict=_folder_weights(src), hf_config=config,
                      preprocessor_config=_read_json(osp.join(src, 'preprocessor_config.json')))
    if not osp.isfile(src):
        raise ConversionError(f'{src}: no such file or folder')
    if src.endswith('.safetensors'):
        return Source(path=src, state_dict=read_safetensors(src))
    checkpoint = _load_torch_file(src)
    return Source(path=src, state_dict=_unwrap(checkpoint), checkpoint=checkpoint)
