"""mmdet_detrx.models.detectors.detrx holds the ...X detectors; the module's former name,
registry_attention, still imports the same classes (user code and old configs' imports)."""
from mmdet.registry import MODELS


def test_former_module_name_imports_the_same_classes():
    from mmdet_detrx.models.detectors import detrx, registry_attention
    assert registry_attention.__all__ == detrx.__all__
    for name in detrx.__all__:
        assert getattr(registry_attention, name) is getattr(detrx, name)
    for name in ('DETRX', 'ConditionalDETRX', 'DeformableDETRX', 'DINOX'):
        assert MODELS.get(name) is getattr(detrx, name)
