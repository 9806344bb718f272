"""Deployment tools: ONNX export (``pytorch2onnx``)."""
