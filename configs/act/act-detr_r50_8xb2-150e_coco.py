# ACT (Zheng, Gao et al., BMVC 2021) on mmdet's DETR-R50: the encoder self-attention becomes
# AdaptiveClusteringAttention; every parameter name is unchanged, so a DETR checkpoint loads
# strictly and evaluates without retraining:
#   python tools/test.py configs/act/act-detr_r50_8xb2-150e_coco.py DETR_CKPT
# Defaults are the official ones: L = 32 hash rounds, bucket width r = 8 on the scaled per-head
# queries q / sqrt(head_dims) (see docs/act.md). configs/act_detr_r50.py is this config.
_base_ = ['mmdet::detr/detr_r50_8xb2-150e_coco.py', '../_base_/act_encoder_attention.py']
custom_imports = dict(imports=['mmdet_detrx'], allow_failed_imports=False)

model = dict(type='DETRX', encoder=dict(layer_cfg=dict(self_attn_cfg=_base_.act_self_attn_cfg)))

# Upstream's auto_scale_lr lacks `enable`, without which mmdet's tools/train.py --auto-scale-lr
# refuses the config; base_batch_size stays upstream's.
auto_scale_lr = dict(enable=False)
