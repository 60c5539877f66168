"""Layer classes that behave like ``nn.Linear`` but keep their weight quantized.

``deltatune.quant`` appends its classes here on import; targeting and the LoRA family treat
them as linear layers and reach their weights only through ``core.base_weight`` /
``core.set_base_weight``, so no method branches on the quantization backend.
"""
QUANT_LINEAR_TYPES: list[type] = []
