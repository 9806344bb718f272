# A small Conditional DETR-DC5-R18 (exact multi-head self-attention in the encoder, as DETR)
# trained on the embedded dataset with the same backbone and schedule as configs/detr.
# Conditional DETR's conditional cross-attention converges several times faster than DETR's and
# leaves the encoder -- the part ACT replaces -- exactly DETR's.
#
# The ResNet-18 starts from a checkpoint of the Deformable DETR demo config (trained on the same
# images; configs/conditional_detr/README.md has the command) in place of the ImageNet weights
# DETRs start from, which cannot be downloaded here; set backbone_checkpoint=None to start from
# scratch.
backbone_checkpoint = 'work_dirs/demo_deformable/iter_1000.pth'

_base_ = '../detr/detr_r18-dc5_1xb8-3000i_synthetic-shapes.py'

# 256 dims as in DETR: mmdet's Conditional DETR decoder hard-codes a 256-dim sine embedding of
# its reference points (coordinate_to_encoding's default), so other widths do not run upstream.
embed_dims = 256
model = dict(
    type='ConditionalDETRX',
    backbone=dict(
        init_cfg=dict(
            _delete_=True, type='Pretrained', checkpoint=backbone_checkpoint, prefix='backbone.')
        if backbone_checkpoint else None),
    neck=dict(out_channels=embed_dims),
    encoder=dict(
        layer_cfg=dict(
            self_attn_cfg=dict(embed_dims=embed_dims),
            ffn_cfg=dict(embed_dims=embed_dims, feedforward_channels=1024))),
    decoder=dict(
        layer_cfg=dict(
            ffn_cfg=dict(embed_dims=embed_dims, feedforward_channels=1024),
            self_attn_cfg=dict(_delete_=True, embed_dims=embed_dims, num_heads=8, attn_drop=0.0,
                               cross_attn=False),
            cross_attn_cfg=dict(_delete_=True, embed_dims=embed_dims, num_heads=8,
                                attn_drop=0.0, cross_attn=True))),
    positional_encoding=dict(num_feats=embed_dims // 2),
    bbox_head=dict(
        type='ConditionalDETRHead',
        embed_dims=embed_dims,
        loss_cls=dict(_delete_=True, type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25,
                      loss_weight=2.0)),
    train_cfg=dict(assigner=_base_.focal_hungarian_assigner))  # focal costs for a focal loss

optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'backbone': dict(lr_mult=0.1)}))
