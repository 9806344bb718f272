# ACT on the small DETR-DC5-R18 trained on the embedded dataset: evaluate that DETR's checkpoint
# with clustered encoder attention, no retraining (docs/act.md):
#   python tools/test.py configs/act/act-detr_r18-dc5_1xb8-3000i_synthetic-shapes.py DETR_CKPT
#   python tools/analysis/act_tradeoff.py configs/act/act-detr_r18-dc5_1xb8-3000i_synthetic-shapes.py DETR_CKPT
_base_ = [
    '../detr/detr_r18-dc5_1xb8-3000i_synthetic-shapes.py', '../_base_/act_encoder_attention.py'
]

model = dict(encoder=dict(layer_cfg=dict(self_attn_cfg=_base_.act_self_attn_cfg)))
