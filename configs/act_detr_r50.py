# ACT (Zheng, Gao et al., BMVC 2021) on mmdet's DETR-R50: the encoder self-attention becomes
# AdaptiveClusteringAttention; every parameter name is unchanged, so a DETR checkpoint loads
# strictly and evaluates without retraining:
#   python tools/test.py configs/act_detr_r50.py DETR_CKPT
# Defaults are the official ones: L = 32 hash rounds, bucket width r = 8 on the scaled per-head
# queries q / sqrt(head_dims) (see docs/act.md).
_base_ = 'mmdet::detr/detr_r50_8xb2-150e_coco.py'
custom_imports = dict(imports=['mmdet_detrx'], allow_failed_imports=False)

model = dict(
    type='DETRX',
    encoder=dict(
        layer_cfg=dict(
            self_attn_cfg=dict(
                type='AdaptiveClusteringAttention', num_hashes=32, bucket_width=8.0,
                seed=0))))

# Upstream's auto_scale_lr lacks `enable`, without which mmdet's tools/train.py --auto-scale-lr
# refuses the config; base_batch_size stays upstream's.
auto_scale_lr = dict(enable=False)
