"""README's "Your COCO folder, your classes" and "Inference on images", run from the README's text.

A COCO folder with two renamed classes (synthetic circles and squares, the triangles dropped);
the README's config with its base swapped for the CPU-sized one
(``configs/coco_folder/deformable-detrx_r18_1xb8-1000i_coco-folder.py``) and its paths for the
test's; ``tools/train.py`` fine-tunes it from a 3-class checkpoint for 2 iterations and
``tools/test.py`` evaluates it, with the README's commands; then the README's inference snippets
run on its images. Bad input: a missing image, an annotation outside ``classes``, classes and
``num_classes`` that disagree, an undecodable image.
"""
import ast
import copy
import json
import os
import os.path as osp
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
from _helpers import REPO_CONFIGS, REPO_ROOT
from mmdet.registry import MODELS
from mmengine.config import Config
from mmengine.registry import init_default_scope

import mmdet_detrx  # noqa: F401
from mmdet_detrx.datasets import CocoFolderError, generate_synthetic_shapes
from mmdet_detrx.models.class_dependent import class_dependent_keys
from mmdet_detrx.stacks import installed_stack

R18_BASE = osp.join(REPO_CONFIGS, 'coco_folder', 'deformable-detrx_r18_1xb8-1000i_coco-folder.py')
LOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')
TINY_RUN = [*[f'{loader}.{key}' for loader in LOADERS
              for key in ('batch_size=2', 'num_workers=0', 'persistent_workers=False')],
            'train_cfg.max_iters=2', 'train_cfg.val_interval=2',
            'default_hooks.checkpoint.interval=2', 'default_hooks.logger.interval=1',
            'randomness.seed=0']


def readme_section(title):
    text = open(osp.join(REPO_ROOT, 'README.md')).read()
    start = text.index(f'### {title}\n')
    end = re.compile(r'^#{2,3} ', re.M).search(text, start + 4)  # not a code comment
    return text[start:end.start() if end else None]


def code_blocks(section, language):
    return re.findall(rf'```{language}\n(.*?)```', section, re.S)


def _run(args, cwd=REPO_ROOT, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO_ROOT)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900, **kwargs)


def _check(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def write_coco_folder(root, classes, cfg):
    """Synthetic shapes as a user's COCO folder: circles and squares renamed to ``classes``,
    triangles dropped; the file layout is the one the config names."""
    shapes = osp.join(osp.dirname(root), 'shapes')
    generate_synthetic_shapes(shapes, seed=1, num_train=12, num_val=4, image_size=(96, 96),
                              max_objects=3)
    for loader in ('train_dataloader', 'val_dataloader'):
        dataset = cfg[loader].dataset
        split = 'train' if loader == 'train_dataloader' else 'val'
        with open(osp.join(shapes, 'annotations', f'{split}.json')) as f:
            coco = json.load(f)
        coco['categories'] = [dict(id=i + 1, name=name) for i, name in enumerate(classes)]
        coco['annotations'] = [ann for ann in coco['annotations'] if ann['category_id'] <= 2]
        ann_file = osp.join(root, dataset.ann_file)
        os.makedirs(osp.dirname(ann_file), exist_ok=True)
        with open(ann_file, 'w') as f:
            json.dump(coco, f)
        shutil.copytree(osp.join(shapes, split), osp.join(root, dataset.data_prefix.img))


@pytest.fixture(scope='module')
def recipe(tmp_path_factory):
    """The README's config and folder, and a 3-class checkpoint of the same model."""
    tmp = tmp_path_factory.mktemp('coco_folder')
    section = readme_section('Your COCO folder, your classes')
    config_text = code_blocks(section, 'python')[0]
    user_root = re.search(r"^data_root = '(.*)'$", config_text, re.M).group(1)
    classes = ast.literal_eval(re.search(r'^classes = (.*)$', config_text, re.M).group(1))
    folder = str(tmp / 'my_coco') + '/'
    config_text = re.sub(r"^_base_ = .*$", f'_base_ = {R18_BASE!r}', config_text, flags=re.M)
    config_text = config_text.replace(repr(user_root), repr(folder))
    config = str(tmp / 'my_coco.py')
    with open(config, 'w') as f:
        f.write(config_text)
    cfg = Config.fromfile(config)
    write_coco_folder(folder, classes, cfg)

    init_default_scope('mmdet')
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.bbox_head.num_classes = 3
    torch.manual_seed(0)
    model = MODELS.build(model_cfg)
    model.init_weights()
    checkpoint = str(tmp / 'three_classes.pth')
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, checkpoint)
    return dict(tmp=tmp, section=section, config=config, cfg=cfg, folder=folder,
                classes=classes, checkpoint=checkpoint,
                class_dependent=class_dependent_keys(model))


def test_config_has_nothing_of_the_embedded_dataset(recipe):
    cfg = recipe['cfg']
    for loader in LOADERS:
        dataset = cfg[loader].dataset
        assert dataset.type == 'CocoFolderDataset'
        assert 'spec' not in dataset and 'synthetic' not in json.dumps(dataset.to_dict())
        assert dataset.data_root == recipe['folder']
        assert list(dataset.metainfo.classes) == list(recipe['classes'])
    assert cfg.model.bbox_head.num_classes == len(recipe['classes'])


@pytest.fixture(scope='module')
def fine_tuned(recipe):
    """The README's bash commands, with the test's paths, a 3-class load_from and 2 iterations."""
    tmp = recipe['tmp']
    work_dir = str(tmp / 'work')
    commands = [shlex.split(line, comments=True) for line in
                code_blocks(recipe['section'], 'bash')[0].strip().splitlines()]
    logs = []
    for command in commands:
        assert command[0] == 'python'
        args = [{'my_coco.py': recipe['config'], 'work_dirs/my_coco': work_dir,
                 'work_dirs/my_coco/epoch_50.pth': osp.join(work_dir, 'iter_2.pth')}.get(a, a)
                for a in command[1:]]
        logs.append(_check(_run([*args, '--cfg-options', f'load_from={recipe["checkpoint"]}',
                                 *TINY_RUN])))
    return work_dir, logs


def test_fine_tunes_from_three_classes_then_evaluates(recipe, fine_tuned):
    work_dir, (train_log, test_log) = fine_tuned
    line = next(line for line in train_log.splitlines() if 'class-dependent' in line)
    keys = recipe['class_dependent']
    assert 'bbox_head.cls_branches.0.weight' in keys  # a Deformable DETR / DINO head
    assert (f'fine-tuning from 3 to 2 classes: re-initialised {len(keys)} class-dependent '
            f'parameters ({", ".join(keys)})') in line
    assert 'size mismatch' not in train_log and 'do not match exactly' not in train_log
    assert osp.isfile(osp.join(work_dir, 'iter_2.pth'))
    assert 'coco/bbox_mAP' in train_log  # validation at iteration 2
    assert 'coco/bbox_mAP' in test_log


def test_test_tool_refuses_a_checkpoint_of_another_class_count(recipe):
    """Evaluating the 3-class checkpoint with the 2-class config would score random class
    outputs: only fine-tuning re-initialises them."""
    proc = _run(['tools/test.py', recipe['config'], recipe['checkpoint'], '--work-dir',
                 str(recipe['tmp'] / 'work_refused'), '--cfg-options', *TINY_RUN])
    assert proc.returncode != 0
    assert 'the checkpoint has 3 classes and the model 2' in proc.stderr
    assert 'coco/bbox_mAP' not in proc.stdout + proc.stderr


def test_inference_snippets(recipe, fine_tuned):
    """The README's inference blocks in one fresh process: DetInferencer on a folder and one
    image, init_detector, then weights only (failing before `import mmdet_detrx`, working after);
    an undecodable image fails naming it."""
    work_dir, _ = fine_tuned
    tmp = recipe['tmp']
    val_dir = osp.join(recipe['folder'], recipe['cfg'].val_dataloader.dataset.data_prefix.img)
    image = osp.join(val_dir, sorted(os.listdir(val_dir))[0])
    broken = str(tmp / 'broken.jpg')
    with open(broken, 'wb') as f:
        f.write(b'\xff\xd8 not a jpeg')
    blocks = code_blocks(readme_section('Inference on images'), 'python')
    replace = {'my_coco.py': recipe['config'],
               'work_dirs/my_coco/epoch_50.pth': osp.join(work_dir, 'iter_2.pth'),
               'data/my_coco/val/000001.jpg': image, 'data/my_coco/val/': val_dir + '/',
               "'outputs'": repr(str(tmp / 'outputs'))}

    def substituted(block):
        for old, new in replace.items():
            block = block.replace(old if old.startswith("'") else repr(old),
                                  new if old.startswith("'") else repr(new))
        return block

    weights_only = substituted(blocks[2])
    without_import = weights_only.replace('import mmdet_detrx', 'pass  #')
    script = '\n'.join([
        'try:', *['    ' + line for line in without_import.splitlines()],
        "    print('NO ERROR WITHOUT IMPORT')",
        'except Exception as error:', "    print('WITHOUT IMPORT:', type(error).__name__)",
        substituted(blocks[0]), substituted(blocks[1]), weights_only,
        f"print('WEIGHTS ONLY:', sorted(inferencer({image!r})['predictions'][0]))",
        'try:', f'    inferencer({broken!r})',
        'except Exception as error:', "    print('BROKEN:', error)",
    ])
    out = _check(_run(['-c', script], cwd=str(tmp)))
    # OpenMMLab's mmengine 0.10.7 cannot read its own checkpoints under torch >= 2.6; OneDL's
    # reads them with its own allow-list (and falls back to a full pickle: docs/tools.md).
    onedl = installed_stack()['mmengine'][0][0] == 'onedl'
    assert ('NO ERROR WITHOUT IMPORT' if onedl else 'WITHOUT IMPORT: UnpicklingError') in out
    assert "WEIGHTS ONLY: ['bboxes', 'labels', 'scores']" in out
    assert f'BROKEN: failed to load image: {broken}' in out
    outputs = tmp / 'outputs'
    assert sorted(os.listdir(outputs / 'vis')) == sorted(os.listdir(val_dir))
    preds = json.load(open(outputs / 'preds' / (osp.splitext(osp.basename(image))[0] + '.json')))
    assert set(preds['labels']) <= {0, 1} and len(preds['bboxes']) == len(preds['scores'])


def _copy_folder(recipe, name):
    folder = str(recipe['tmp'] / name) + '/'
    shutil.copytree(recipe['folder'], folder)
    config = recipe['config'].replace('my_coco.py', f'{name}.py')
    with open(recipe['config']) as f, open(config, 'w') as g:
        g.write(f.read().replace(repr(recipe['folder']), repr(folder)))
    return folder, config


def test_missing_image_stops_before_anything_is_written(recipe):
    folder, config = _copy_folder(recipe, 'missing_image')
    train_dir = osp.join(folder, recipe['cfg'].train_dataloader.dataset.data_prefix.img)
    missing = osp.join(train_dir, sorted(os.listdir(train_dir))[3])
    os.remove(missing)
    work_dir = str(recipe['tmp'] / 'work_missing')
    proc = _run(['tools/train.py', config, '--work-dir', work_dir, '--cfg-options',
                 f'load_from={recipe["checkpoint"]}', *TINY_RUN])
    assert proc.returncode != 0
    assert 'CocoFolderError' in proc.stderr and missing in proc.stderr
    assert 'train_dataloader.dataset.data_prefix.img' in proc.stderr
    assert not osp.exists(work_dir)


def test_annotation_outside_classes_is_refused_naming_file_and_key(recipe):
    folder, config = _copy_folder(recipe, 'extra_category')
    ann_file = osp.join(folder, recipe['cfg'].val_dataloader.dataset.ann_file)
    coco = json.load(open(ann_file))
    coco['categories'].append(dict(id=3, name='triangle'))
    coco['annotations'][0]['category_id'] = 3
    json.dump(coco, open(ann_file, 'w'))
    cfg = Config.fromfile(config)
    from mmdet_detrx.utils import check_dataset_files
    with pytest.raises(CocoFolderError) as info:
        check_dataset_files(cfg, ('val_dataloader', ))  # our tools, before the runner
    message = str(info.value)
    assert ann_file in message and "category 'triangle'" in message
    assert 'val_dataloader.dataset.metainfo.classes' in message
    with pytest.raises(CocoFolderError, match="category 'triangle'"):  # any tool, when built
        from mmdet.registry import DATASETS
        DATASETS.build(cfg.val_dataloader.dataset)


def test_classes_and_num_classes_must_agree(recipe):
    from mmdet_detrx.engine.hooks import NumClassesMismatchError
    from mmdet_detrx.utils import check_dataset_files
    cfg = Config.fromfile(recipe['config'])
    cfg.model.bbox_head.num_classes = 3
    with pytest.raises(NumClassesMismatchError) as info:
        check_dataset_files(cfg, ('train_dataloader', 'val_dataloader'))
    message = str(info.value)
    assert 'has 2 classes' in message and 'model.bbox_head.num_classes is 3' in message
    assert 'train_dataloader.dataset.metainfo' in message


@pytest.mark.parametrize('name', sorted(name for name in os.listdir(
    osp.join(REPO_CONFIGS, 'coco_folder')) if name.endswith('.py')))
def test_bases_without_your_classes_ask_for_them(name):
    """A base used as is compares no COCO-80 default with num_classes: the dataset asks for the
    classes instead."""
    from mmdet_detrx.datasets import check_coco_folder
    from mmdet_detrx.engine.hooks import check_num_classes_cfg
    cfg = Config.fromfile(osp.join(REPO_CONFIGS, 'coco_folder', name))
    check_num_classes_cfg(cfg, LOADERS)
    assert cfg.default_hooks.num_classes_check.type == 'NumClassesCheckHook'
    with pytest.raises(CocoFolderError, match=r'set your classes.*train_dataloader\.dataset\.'
                       r'metainfo=dict\(classes='):
        check_coco_folder({}, 'ann.json', cfg.train_dataloader.dataset.get('metainfo'), None,
                          loader='train_dataloader')
