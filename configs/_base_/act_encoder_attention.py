# ACT's encoder self-attention, official settings: L = 32 hash rounds, bucket width r = 8 on the
# scaled per-head queries q / sqrt(head_dims) (docs/act.md). A distinct name, so it sits next to
# any detector base; a config merges it into that detector's encoder self-attention:
#   _base_ = [DETECTOR_CONFIG, '../_base_/act_encoder_attention.py']
#   model = dict(encoder=dict(layer_cfg=dict(self_attn_cfg=_base_.act_self_attn_cfg)))
act_self_attn_cfg = dict(
    type='AdaptiveClusteringAttention', num_hashes=32, bucket_width=8.0, seed=0)
