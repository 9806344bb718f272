# ACT on the small Conditional DETR-DC5-R18 trained on the embedded dataset (its encoder is
# DETR's): evaluate that model's checkpoint with clustered encoder attention, no retraining
# (docs/act.md):
#   python tools/test.py configs/act/act-conditional-detrx_r18-dc5_1xb8-3000i_synthetic-shapes.py CKPT
#   python tools/analysis/act_tradeoff.py configs/act/act-conditional-detrx_r18-dc5_1xb8-3000i_synthetic-shapes.py CKPT
_base_ = [
    '../conditional_detr/conditional-detrx_r18-dc5_1xb8-3000i_synthetic-shapes.py',
    '../_base_/act_encoder_attention.py'
]

model = dict(encoder=dict(layer_cfg=dict(self_attn_cfg=_base_.act_self_attn_cfg)))
