"""Export stage: run a model outside PyTorch (ONNX with KV cache and ONNX Runtime).

Example:
    >>> import hf_optim
    >>> report = hf_optim.export_onnx("path/to/model", "exported/")
    >>> model = hf_optim.OnnxCausalLM.from_pretrained("exported/")
"""
