"""Checkpoints in the original repositories' layouts, for the converter tests
(tests/test_converters/test_official_*.py).

Where a reference implementation runs here (HF transformers' DETR and Deformable DETR), the
original-layout weights are an HF model's weights renamed back with the renames HF's own
conversion scripts document (``convert_detr_original_pytorch_checkpoint_to_pytorch.py``,
``convert_deformable_detr_to_pytorch.py``: original -> HF 4.x names) plus transformers 5's
renames of those (``out_proj`` -> ``o_proj``, ``fc1`` -> ``mlp.fc1``; see
``mmdet_detrx.converters._hf_common.HUB_KEY_RENAMES``). The converted model must then give the
HF model's outputs. detrex's Deformable DETR layout is derived from the original one with the
renames of detrex's own ``projects/deformable_detr/converter.py``.

Where none runs (DINO, detrex's DINO), :func:`dino_official_state_dict` writes the key set and
shapes the original module definitions produce (IDEA-Research/DINO ``models/dino/dino.py``,
``deformable_transformer.py``; the backbone is a real torchvision ResNet's state dict).
"""
import argparse
import re
from typing import Dict

import torch

_W = r'(weight|bias)'


def _rename(state_dict, rules, strict=True) -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        for pattern, template in rules:
            m = re.fullmatch(pattern, key)
            if m:
                new = template(m) if callable(template) else m.expand(template)
                if new is not None:
                    out[new] = value.clone()
                break
        else:
            if strict:
                raise KeyError(f'no test rename for {key}')
            out[key] = value.clone()
    return _pack_qkv(out)


def _pack_qkv(state_dict):
    """``X.in_proj_weight#q``/``#k``/``#v`` -> ``X.in_proj_weight`` (nn.MultiheadAttention)."""
    out, parts = {}, {}
    for key, value in state_dict.items():
        if '#' in key:
            name, part = key.split('#')
            parts.setdefault(name, {})[part] = value
        else:
            out[key] = value
    for name, qkv in parts.items():
        out[name] = torch.cat([qkv['q'], qkv['k'], qkv['v']], dim=0)
    return out


def _mha(src, dst):
    return [(src + rf'\.([qkv])_proj\.{_W}', dst + r'.in_proj_\3#\2'),
            (src + rf'\.o_proj\.{_W}', dst + r'.out_proj.\2')]


def hf_to_official_detr(hf_state_dict) -> Dict[str, torch.Tensor]:
    """HF ``DetrForObjectDetection`` (timm backbone, transformers 5 names) -> facebookresearch/
    detr's ``DETR`` state dict (``models/detr.py``, ``transformer.py``)."""
    enc, dec = r'model\.encoder\.layers\.(\d+)', r'model\.decoder\.layers\.(\d+)'
    rules = [
        (r'model\.backbone\.model\.(.*)', r'backbone.0.body.\1'),
        (rf'model\.input_projection\.{_W}', r'input_proj.\1'),
        (r'model\.query_position_embeddings\.weight', 'query_embed.weight'),
        *_mha(enc + r'\.self_attn', r'transformer.encoder.layers.\1.self_attn'),
        (enc + rf'\.self_attn_layer_norm\.{_W}', r'transformer.encoder.layers.\1.norm1.\2'),
        (enc + rf'\.mlp\.fc1\.{_W}', r'transformer.encoder.layers.\1.linear1.\2'),
        (enc + rf'\.mlp\.fc2\.{_W}', r'transformer.encoder.layers.\1.linear2.\2'),
        (enc + rf'\.final_layer_norm\.{_W}', r'transformer.encoder.layers.\1.norm2.\2'),
        *_mha(dec + r'\.self_attn', r'transformer.decoder.layers.\1.self_attn'),
        *_mha(dec + r'\.encoder_attn', r'transformer.decoder.layers.\1.multihead_attn'),
        (dec + rf'\.self_attn_layer_norm\.{_W}', r'transformer.decoder.layers.\1.norm1.\2'),
        (dec + rf'\.encoder_attn_layer_norm\.{_W}', r'transformer.decoder.layers.\1.norm2.\2'),
        (dec + rf'\.final_layer_norm\.{_W}', r'transformer.decoder.layers.\1.norm3.\2'),
        (dec + rf'\.mlp\.fc1\.{_W}', r'transformer.decoder.layers.\1.linear1.\2'),
        (dec + rf'\.mlp\.fc2\.{_W}', r'transformer.decoder.layers.\1.linear2.\2'),
        (rf'model\.decoder\.layernorm\.{_W}', r'transformer.decoder.norm.\1'),
        (rf'class_labels_classifier\.{_W}', r'class_embed.\1'),
        (rf'bbox_predictor\.layers\.(\d)\.{_W}', r'bbox_embed.layers.\1.\2'),
    ]
    return _rename(hf_state_dict, rules)


def hf_to_official_deformable_detr(hf_state_dict) -> Dict[str, torch.Tensor]:
    """HF ``DeformableDetrForObjectDetection`` (timm backbone) -> fundamentalvision/
    Deformable-DETR's ``DeformableDETR`` state dict. HF keeps the original's head layout
    (``class_embed.N``, ``bbox_embed.N.layers.K``, the decoder's copies of them)."""
    enc, dec = r'model\.encoder\.layers\.(\d+)', r'model\.decoder\.layers\.(\d+)'
    msda = r'(sampling_offsets|attention_weights|value_proj|output_proj)'
    rules = [
        (r'model\.backbone\.model\.(.*)', r'backbone.0.body.\1'),
        (r'model\.input_proj\.(.*)', r'input_proj.\1'),
        (r'model\.level_embed', 'transformer.level_embed'),
        (r'model\.query_position_embeddings\.weight', 'query_embed.weight'),
        (r'model\.(reference_points|enc_output|enc_output_norm|pos_trans|pos_trans_norm)\.(.*)',
         r'transformer.\1.\2'),
        (enc + rf'\.self_attn\.{msda}\.{_W}', r'transformer.encoder.layers.\1.self_attn.\2.\3'),
        (enc + rf'\.self_attn_layer_norm\.{_W}', r'transformer.encoder.layers.\1.norm1.\2'),
        (enc + rf'\.mlp\.fc1\.{_W}', r'transformer.encoder.layers.\1.linear1.\2'),
        (enc + rf'\.mlp\.fc2\.{_W}', r'transformer.encoder.layers.\1.linear2.\2'),
        (enc + rf'\.final_layer_norm\.{_W}', r'transformer.encoder.layers.\1.norm2.\2'),
        *_mha(dec + r'\.self_attn', r'transformer.decoder.layers.\1.self_attn'),
        (dec + rf'\.encoder_attn\.{msda}\.{_W}',
         r'transformer.decoder.layers.\1.cross_attn.\2.\3'),
        (dec + rf'\.self_attn_layer_norm\.{_W}', r'transformer.decoder.layers.\1.norm2.\2'),
        (dec + rf'\.encoder_attn_layer_norm\.{_W}', r'transformer.decoder.layers.\1.norm1.\2'),
        (dec + rf'\.final_layer_norm\.{_W}', r'transformer.decoder.layers.\1.norm3.\2'),
        (dec + rf'\.mlp\.fc1\.{_W}', r'transformer.decoder.layers.\1.linear1.\2'),
        (dec + rf'\.mlp\.fc2\.{_W}', r'transformer.decoder.layers.\1.linear2.\2'),
        (r'model\.decoder\.((?:class|bbox)_embed\..*)', r'transformer.decoder.\1'),
        (r'((?:class|bbox)_embed\..*)', r'\1'),
    ]
    return _rename(hf_state_dict, rules)


def official_to_detrex_deformable_detr(state_dict) -> Dict[str, torch.Tensor]:
    """The renames of detrex's ``projects/deformable_detr/converter.py`` (original -> detrex),
    class rows kept (the tests use few classes, not COCO's 91)."""
    out = {}
    for key, value in state_dict.items():
        k = key
        if k.startswith('backbone.0.body.'):
            k = k[len('backbone.0.body.'):]
            if 'layer' not in k:
                k = 'stem.' + k
            for t in (1, 2, 3, 4):
                k = k.replace(f'layer{t}', f'res{t + 1}')
            for t in (1, 2, 3):
                k = k.replace(f'bn{t}', f'conv{t}.norm')
            k = k.replace('downsample.0', 'shortcut').replace('downsample.1', 'shortcut.norm')
            k = 'backbone.' + k
        m = re.fullmatch(r'input_proj\.(\d+)\.([01])\.(.*)', k)
        if m:
            level, part = int(m[1]), 'conv' if m[2] == '0' else 'norm'
            outs = sum(1 for n in state_dict if re.fullmatch(r'input_proj\.\d+\.0\.weight', n)
                       and state_dict[n].shape[-1] == 1)
            k = (f'neck.convs.{level}.{part}.{m[3]}' if level < outs else
                 f'neck.extra_convs.{level - outs}.{part}.{m[3]}')
        if 'encoder.layers' in k:
            for old, new in (('self_attn', 'attentions.0'), ('linear1', 'ffns.0.layers.0.0'),
                             ('linear2', 'ffns.0.layers.1'), ('norm1', 'norms.0'),
                             ('norm2', 'norms.1')):
                if old in k:
                    k = k.replace(old, new)
                    break
        elif 'decoder.layers' in k:
            for old, new in (('linear1', 'ffns.0.layers.0.0'), ('linear2', 'ffns.0.layers.1'),
                             ('norm1', 'norms.1'), ('norm2', 'norms.0'), ('norm3', 'norms.2'),
                             ('self_attn', 'attentions.0.attn'), ('cross_attn', 'attentions.1')):
                if old in k:
                    k = k.replace(old, new)
                    break
        k = k.replace('level_embed', 'level_embeds').replace('query_embed.', 'query_embedding.')
        out[k] = value.clone()
    return out


def save_official(path, state_dict, **args) -> str:
    """``{'model': state_dict, 'args': Namespace(**args)}`` as the training scripts save it
    (no ``args`` entry when none are given, as the hub-released DETR files)."""
    checkpoint = {'model': state_dict, 'epoch': 49}
    if args:
        checkpoint['args'] = argparse.Namespace(**args)
    torch.save(checkpoint, str(path))
    return str(path)


# ------------------------------------------------------------------------- DINO key sets
def torchvision_resnet_body(depth=18) -> Dict[str, torch.Tensor]:
    """A torchvision ResNet's weights as ``IntermediateLayerGetter`` keeps them (no ``fc``) with
    frozen BatchNorm (no ``num_batches_tracked``), perturbed off the init."""
    import torchvision
    torch.manual_seed(0)
    net = getattr(torchvision.models, f'resnet{depth}')()
    out = {}
    for key, value in net.state_dict().items():
        if key.startswith('fc.') or key.endswith('num_batches_tracked'):
            continue
        value = value.clone()
        if key.endswith('running_var'):
            value = 0.5 + torch.rand_like(value)
        else:
            value = value + 0.05 * torch.randn_like(value)
        out[key] = value
    return out


def dino_official_state_dict(*, depth=18, d=256, heads=8, levels=4, enc_points=4,
                             dec_points=4, enc_layers=2, dec_layers=3, ffn=64, queries=20,
                             num_classes=91, labelbook=None, seed=0) -> Dict[str, torch.Tensor]:
    """The keys and shapes of IDEA-Research/DINO's ``DINO`` (two_stage_type='standard',
    embed_init_tgt, dec_pred_{class,bbox}_embed_share=True, two_stage_{class,bbox}_embed_share
    =False, decoder_sa_type='sa', return_interm_indices [1, 2, 3]), random values."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape):
        return 0.1 * torch.randn(*shape, generator=g)

    def linear(prefix, n_in, n_out):
        return {f'{prefix}.weight': t(n_out, n_in), f'{prefix}.bias': t(n_out)}

    def norm(prefix, n):
        return {f'{prefix}.weight': 1 + t(n), f'{prefix}.bias': t(n)}

    def mlp(prefix, n_in, hidden, n_out, layers):
        dims = [n_in] + [hidden] * (layers - 1) + [n_out]
        sd = {}
        for i in range(layers):
            sd.update(linear(f'{prefix}.layers.{i}', dims[i], dims[i + 1]))
        return sd

    def msda(prefix, points):
        return {**linear(f'{prefix}.sampling_offsets', d, heads * levels * points * 2),
                **linear(f'{prefix}.attention_weights', d, heads * levels * points),
                **linear(f'{prefix}.value_proj', d, d), **linear(f'{prefix}.output_proj', d, d)}

    sd = {f'backbone.0.body.{k}': v for k, v in torchvision_resnet_body(depth).items()}
    expansion = 4 if depth >= 50 else 1
    channels = [128 * expansion, 256 * expansion, 512 * expansion]
    for level, c in enumerate(channels):
        sd.update(linear(f'input_proj.{level}.0', c, d))
        sd[f'input_proj.{level}.0.weight'] = t(d, c, 1, 1)
        sd.update(norm(f'input_proj.{level}.1', d))
    for level in range(len(channels), levels):
        c = channels[-1] if level == len(channels) else d
        sd[f'input_proj.{level}.0.weight'] = t(d, c, 3, 3)
        sd[f'input_proj.{level}.0.bias'] = t(d)
        sd.update(norm(f'input_proj.{level}.1', d))
    sd['transformer.level_embed'] = t(levels, d)
    sd['transformer.tgt_embed.weight'] = t(queries, d)
    sd.update(linear('transformer.enc_output', d, d))
    sd.update(norm('transformer.enc_output_norm', d))
    for n in range(enc_layers):
        p = f'transformer.encoder.layers.{n}'
        sd.update({**msda(f'{p}.self_attn', enc_points), **norm(f'{p}.norm1', d),
                   **linear(f'{p}.linear1', d, ffn), **linear(f'{p}.linear2', ffn, d),
                   **norm(f'{p}.norm2', d)})
    for n in range(dec_layers):
        p = f'transformer.decoder.layers.{n}'
        sd.update({**msda(f'{p}.cross_attn', dec_points), **norm(f'{p}.norm1', d),
                   f'{p}.self_attn.in_proj_weight': t(3 * d, d),
                   f'{p}.self_attn.in_proj_bias': t(3 * d),
                   **linear(f'{p}.self_attn.out_proj', d, d), **norm(f'{p}.norm2', d),
                   **linear(f'{p}.linear1', d, ffn), **linear(f'{p}.linear2', ffn, d),
                   **norm(f'{p}.norm3', d)})
    sd.update(norm('transformer.decoder.norm', d))
    sd.update(mlp('transformer.decoder.ref_point_head', 2 * d, d, d, 2))
    class_embed, bbox_embed = linear('x', d, num_classes), mlp('x', d, d, 4, 3)
    for n in range(dec_layers):  # one module shared by every decoder layer ...
        for prefix in ('', 'transformer.decoder.'):  # ... and registered twice
            sd.update({f'{prefix}class_embed.{n}.{k[2:]}': v.clone()
                       for k, v in class_embed.items()})
            sd.update({f'{prefix}bbox_embed.{n}.{k[2:]}': v.clone()
                       for k, v in bbox_embed.items()})
    sd.update(linear('transformer.enc_out_class_embed', d, num_classes))
    sd.update(mlp('transformer.enc_out_bbox_embed', d, d, 4, 3))
    sd['label_enc.weight'] = t((labelbook or num_classes) + 1, d)
    return sd


def official_dino_to_detrex(state_dict, num_classes: int) -> Dict[str, torch.Tensor]:
    """IDEA-Research/DINO layout -> detrex's DINO (``projects/dino/modeling``): detrex's
    renames for the shared parts (backbone, neck, layers, ``level_embeds``), its 7 separate
    heads (index 6 scores the encoder's tokens, registered in the decoder too) and a
    ``label_enc`` of ``num_classes`` rows."""
    out = official_to_detrex_deformable_detr(state_dict)
    layers = 1 + max(int(m[1]) for k in out
                     for m in [re.match(r'class_embed\.(\d+)\.', k)] if m)
    for kind in ('class', 'bbox'):
        for key in [k for k in out if k.startswith(f'transformer.enc_out_{kind}_embed.')]:
            suffix = key[len(f'transformer.enc_out_{kind}_embed.'):]
            value = out.pop(key)
            out[f'{kind}_embed.{layers}.{suffix}'] = value
            out[f'transformer.decoder.{kind}_embed.{layers}.{suffix}'] = value.clone()
    out['label_enc.weight'] = out['label_enc.weight'][:num_classes].clone()
    return out
