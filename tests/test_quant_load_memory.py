"""Streaming a checkpoint into NF4 under a memory watchdog (issue 18): anonymous memory never
exceeds the quantized model + one fp32 transformer block + a fixed margin, and nothing of the
checkpoint stays mapped once loading ends; the same with calibrated scales computed while
streaming (quant/sequential.py), plus the calibration activations."""
import gc

import pytest
import torch

import deltatune as dt
from deltatune.core.procmem import MemoryTrace, release_to_os
from deltatune.quant.layers import quantized_layers

pytestmark = pytest.mark.usefixtures("one_thread")
MARGIN_MIB = 12  # allocator slack, bitsandbytes' scratch, the skeleton's buffers (rotary tables)
HIDDEN, MLP, LAYERS, VOCAB = 512, 2048, 4, 1024


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 17.8M-parameter Llama (4 blocks of 4.2M linear weights = 16 MiB fp32 each; 68 MiB in all)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("ckpt")
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=LAYERS,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64,
                      architectures=["LlamaForCausalLM"])
    cfg.save_pretrained(d)
    with torch.device("meta"):  # names and shapes only; random weights written directly (transformers' init is slow)
        shapes = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}, str(d / "model.safetensors"),
              metadata={"format": "pt"})
    return d


def storage_mib(model) -> float:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20


CALIBRATION = (4, 2, 32)  # batches × rows × tokens: 4 × (2, 32, 512) fp32 hidden states = 1 MiB
# the calibrated scale search's temporaries for one layer (quant/search.py: ~5 MiB measured on a
# 2048×512 weight) and the quantized block's forward (bitsandbytes dequantizes a 4 MiB weight per call),
# plus the allocator's keep of those freed temporaries (peaks of 33-52 MiB were measured across runs and
# thread counts; keeping every float block alive, the bug this guards against, peaks at 82.7 MiB)
SEARCH_MIB = 13


def calibration_batches():
    g = torch.Generator().manual_seed(0)
    n, b, t = CALIBRATION
    return [torch.randint(0, VOCAB, (b, t), generator=g) for _ in range(n)]


@pytest.mark.parametrize("calibrated", [False, True], ids=["absmax", "calibrated"])
def test_nf4_load_stays_under_quantized_size_plus_one_block(checkpoint, calibrated):
    import bitsandbytes.functional as bnbf
    import transformers.models.llama.modeling_llama  # noqa: F401  (transformers imports it lazily)

    x = torch.randn(64, 64)  # warm up bitsandbytes' CPU kernels (process state, not the model)
    bnbf.dequantize_4bit(*bnbf.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True))
    gc.collect()
    release_to_os()
    block_mib = (4 * HIDDEN * HIDDEN + 3 * HIDDEN * MLP) * 4 / 2**20
    cal = calibration_batches() if calibrated else None
    n, b, t = CALIBRATION
    # the hidden states in and out of a block, and one batch's MLP intermediate (B, T, MLP) × 3
    act_mib = (2 * n * b * t * HIDDEN + 3 * b * t * MLP) * 4 / 2**20 + SEARCH_MIB if calibrated else 0.0
    with MemoryTrace() as trace:
        model = dt.load_quantized(checkpoint, "nf4", calibration=cal)
        trace.phase("load")
    fp32_mib = sum(p.numel() for p in model.parameters()) * 4 / 2**20  # (quantized layers count as 0 params)
    q_mib = storage_mib(model)
    limit = q_mib + block_mib + act_mib + MARGIN_MIB
    assert trace.peak_anon_mib <= limit, (f"load peaked at {trace.peak_anon_mib:.1f} MiB anonymous; quantized "
                                          f"model {q_mib:.1f} + one fp32 block {block_mib:.1f} + calibration "
                                          f"activations and search {act_mib:.1f} + {MARGIN_MIB}")
    assert model._dt_quant["calibrated"] == (n if calibrated else 0)
    # the margin means something: the whole float model would not fit under the limit
    whole = q_mib - fp32_mib + sum(m.in_features * m.out_features for _, m in quantized_layers(model)) * 4 / 2**20
    assert whole > limit + block_mib
    maps = open("/proc/self/maps").read()
    assert str(checkpoint) not in maps, "the checkpoint is still memory-mapped after loading"
