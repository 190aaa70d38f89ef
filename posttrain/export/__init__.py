"""Shipping a model: lineage, model card (templates/), MLflow registry, ONNX export."""
