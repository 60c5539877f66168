"""LoRA family specs for the shared invariant matrix."""
EMB = {"mlp": ["emb"], "llama": ["embed_tokens"], "bert": ["word_embeddings"], "gpt2": ["wte"], "conv": None}

SPECS = {
    "lora": ("lora", {}, {}),
    "lora_rslora_dropout": ("lora", {"r": 4, "rslora": True, "dropout": 0.1}, {}),
    "dora": ("lora", {"dora": True}, {}),
    "lora_pissa": ("lora", {"init": "pissa", "r": 2}, {"conv": {"targets": ["head"], "modules_to_save": None}}),
    "lora_embedding": ("lora", {}, {m: {"targets": t} for m, t in EMB.items() if t} | {"conv": None}),
}
