"""HF transformers Deformable DETR (single-stage, box refinement, two-stage) ->
DeformableDETRX: equal last-layer logits and boxes (1e-4) on a non-square image and a padded
batch of two sizes.

Two-stage: random weights give near-tied proposal scores, so a 1e-6 difference may reorder
the top-k. The test compares the proposal scores of both models (equal within 1e-4) and then
runs ours with HF's top-k indices (``torch.topk`` answered with them for that one call), which
holds the selection fixed while everything downstream is still computed by our model.
"""
import pytest
import torch
from _helpers.hf_detrs import IMAGE_SHAPES, assert_parity, batch, build_hf, convert_and_build
from mmengine.config import Config


@pytest.mark.parametrize('refine', [False, True], ids=['single-stage', 'box-refine'])
def test_deformable_detr(tmp_path, refine):
    hf = build_hf('deformable_detr', with_box_refine=refine)
    ours, config_path, _ = convert_and_build(hf, tmp_path)
    cfg = Config.fromfile(config_path)
    assert type(ours).__name__ == 'DeformableDETRX'
    assert cfg.model.with_box_refine == refine and not cfg.model.as_two_stage
    assert cfg.model.neck.bias is True  # HF's input projections have a bias before GroupNorm
    assert cfg.model.encoder.layer_cfg.self_attn_cfg.type == 'MSDeformAttn'
    assert cfg.model.encoder.layer_cfg.self_attn_cfg.num_points == 2
    assert cfg.model.decoder.layer_cfg.cross_attn_cfg.num_points == 3
    assert_parity(ours, hf)


def run_with_hf_selection(ours, hf, shapes, monkeypatch, k=15):
    """Run both; ours with HF's top-k proposal indices. Returns (our last-layer logits and
    boxes, our proposal scores, HF's output)."""
    pixels, mask, samples = batch(shapes)
    out = hf(pixel_values=pixels, pixel_mask=mask)
    hf_topk = torch.topk(out.enc_outputs_class[..., 0], k, dim=1)[1]
    seen = {}
    proposal_head = ours.bbox_head.cls_branches[ours.decoder.num_layers]
    hook = proposal_head.register_forward_hook(
        lambda module, args, output: seen.setdefault('scores', output))
    real_topk = torch.topk

    def hf_selection(input, k_, *args, **kwargs):
        if k_ == k and input.dim() == 2 and input.shape[0] == hf_topk.shape[0]:
            seen['selections'] = seen.get('selections', 0) + 1
            return real_topk(input, k_, *args, **kwargs)[0], hf_topk
        return real_topk(input, k_, *args, **kwargs)

    monkeypatch.setattr(torch, 'topk', hf_selection)
    try:
        cls_scores, bbox_preds = ours(pixels, samples, mode='tensor')[:2]
    finally:
        monkeypatch.setattr(torch, 'topk', real_topk)
        hook.remove()
    assert seen['selections'] == 1  # the proposal selection, and nothing else
    return (cls_scores[-1], bbox_preds[-1]), seen['scores'], out


def test_bare_state_dict_file(tmp_path):
    """A state-dict file (no config.json): variant, levels and sampling points from the keys and
    shapes; the heads (in no shape) are assumed 8, as HF's default, which this model has."""
    from mmdet_detrx.converters import convert, write_safetensors
    hf = build_hf('deformable_detr', with_box_refine=True, decoder_attention_heads=8,
                  encoder_layers=1)
    path = tmp_path / 'deformable.safetensors'
    path.write_bytes(write_safetensors(hf.state_dict()))
    config_path, checkpoint_path = convert(str(path), str(tmp_path / 'out'))
    from _helpers.hf_detrs import build_model_from_config
    from mmengine.runner import load_checkpoint
    ours, _ = build_model_from_config(config_path)
    load_checkpoint(ours, checkpoint_path, map_location='cpu', strict=True)
    ours.eval()
    assert_parity(ours, hf)


@torch.no_grad()
def test_two_stage_with_the_proposal_selection_held_fixed(tmp_path, monkeypatch):
    hf = build_hf('deformable_detr', with_box_refine=True, two_stage=True)
    ours, config_path, _ = convert_and_build(hf, tmp_path)
    assert Config.fromfile(config_path).model.num_queries == 15  # two_stage_num_proposals
    for shapes in IMAGE_SHAPES:
        (logits, boxes), scores, out = run_with_hf_selection(ours, hf, shapes, monkeypatch)
        # the proposal scores are the same, up to float error ...
        torch.testing.assert_close(scores, out.enc_outputs_class, atol=1e-4, rtol=0)
        # ... and with the same selection, so are the detections
        torch.testing.assert_close(logits, out.logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(boxes, out.pred_boxes, atol=1e-4, rtol=0)


@torch.no_grad()
def test_coco80_two_stage(tmp_path, monkeypatch):
    """--coco80 on a 91-output (COCO category id) model: the 80 real classes' logits exactly,
    and the proposal head keeps its column 0, so the same proposals are ranked first."""
    from mmdet_detrx.converters._original_common import COCO80_CLASSES, COCO91_IDS
    names = {i: f'id{i}' for i in range(91)}
    hf = build_hf('deformable_detr', with_box_refine=True, two_stage=True, encoder_layers=1,
                  id2label=names, label2id={v: k for k, v in names.items()})
    ours, config_path, _ = convert_and_build(hf, tmp_path, coco80=True)
    assert Config.fromfile(config_path).metainfo.classes == COCO80_CLASSES
    (logits, boxes), scores, out = run_with_hf_selection(ours, hf, IMAGE_SHAPES[1], monkeypatch)
    torch.testing.assert_close(scores[..., 0], out.enc_outputs_class[..., 0], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits, out.logits[..., list(COCO91_IDS)], atol=1e-4, rtol=0)
    torch.testing.assert_close(boxes, out.pred_boxes, atol=1e-4, rtol=0)
