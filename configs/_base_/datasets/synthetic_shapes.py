# The embedded synthetic-shapes dataset (mmdet_detrx.datasets.SyntheticShapesDataset): written
# into data_root on first use, then loaded by mmdet's CocoDataset pipeline and scored by CocoMetric.
# Move it with ONE key: `--cfg-options data_root=DIR` (our tools/train.py and tools/test.py move
# the dataloaders and evaluators with it), or MMDET_DETRX_DATA_ROOT=DIR in the environment (any
# tool, mmdet's own included). The variable is read as data (os.environ), never pasted into the
# config's source as mmengine's '{{$VAR:default}}' does, so any path works (quotes, spaces) and
# no value runs as code. (__import__, not `import os`: mmengine takes a config that imports a
# module from outside the venv's own prefix, such as os in a venv, for a lazy-import config.)
custom_imports = dict(imports=['mmdet_detrx'], allow_failed_imports=False)

dataset_type = 'SyntheticShapesDataset'
data_root = (__import__('os').environ.get('MMDET_DETRX_DATA_ROOT')
             or 'data/synthetic_shapes').rstrip('/') + '/'
# Every dataset sharing data_root must use the same spec (it is checked against spec.json).
shapes_spec = dict(seed=0, num_train=600, num_val=100, image_size=(160, 160), max_objects=6)
img_scale = (160, 160)
backend_args = None

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]

train_dataloader = dict(
    batch_size=8,
    num_workers=1,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    batch_sampler=dict(type='AspectRatioBatchSampler'),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        spec=shapes_spec,
        ann_file='annotations/train.json',
        data_prefix=dict(img='train/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=1),
        pipeline=train_pipeline,
        backend_args=backend_args))
val_dataloader = dict(
    batch_size=8,
    num_workers=1,
    persistent_workers=True,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        spec=shapes_spec,
        ann_file='annotations/val.json',
        data_prefix=dict(img='val/'),
        test_mode=True,
        pipeline=test_pipeline,
        backend_args=backend_args))
test_dataloader = val_dataloader

# Test-time augmentation (tools/test.py --tta, ours or mmdet's): original + horizontal flip,
# merged by mmdet's DetTTAModel with NMS.
tta_model = dict(
    type='DetTTAModel',
    tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))
tta_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='TestTimeAug',
         transforms=[
             [dict(type='Resize', scale=img_scale, keep_ratio=True)],
             [dict(type='RandomFlip', prob=1.), dict(type='RandomFlip', prob=0.)],
             [dict(type='LoadAnnotations', with_bbox=True)],
             [dict(type='PackDetInputs',
                   meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor',
                              'flip', 'flip_direction'))],
         ])
]

val_evaluator = dict(
    type='CocoMetric',
    ann_file=data_root + 'annotations/val.json',
    metric='bbox',
    format_only=False,
    backend_args=backend_args)
test_evaluator = val_evaluator
