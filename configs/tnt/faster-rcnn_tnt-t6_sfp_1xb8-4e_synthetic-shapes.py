# Faster R-CNN with a small TNT (192-d patches, 16 visual words of 12-d each, 6 blocks) + simple
# feature pyramid, trained from scratch on the embedded synthetic-shapes dataset (no download,
# CPU: see README.md for the run). The ViT-T6 config with the backbone swapped: same 192-d
# stride-16 output, neck, heads and schedule.
_base_ = '../vit/faster-rcnn_vit-t6_sfp_1xb8-4e_synthetic-shapes.py'

model = dict(
    backbone=dict(
        _delete_=True,
        type='TNT',
        arch=dict(embed_dims=192, inner_dims=12, num_layers=6, num_heads=3, inner_num_heads=2,
                  mlp_ratio=4.),
        pretrain_img_size=160,  # the dataset's image size: the 10x10 grid needs no resizing
        init_cfg=None))  # from scratch: no pretrained weights offline
