"""liverstage.export: a trained checkpoint -> ONNX (fp32 / fp16 / int8), TensorRT 11 engine, Triton
repository, each checked against PyTorch fp32 and described by a model card.

Entry point: `liverstage.export.api.export_checkpoint` (the `liverstage export` command).
Imports torch; the light runtime never imports this package.
"""
