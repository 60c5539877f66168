"""Tiny randomly-initialised models shared by the fast tests (seconds, no downloads)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

torch.set_num_threads(2)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, ids):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(self.emb(ids)))))).mean(1)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 1)
        self.c3 = nn.Conv1d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x))))  # (B, 8, H, W)
        h = self.c3(h.flatten(2))  # (B, 8, H*W)
        return self.head(h.mean(-1))


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64)
    return BertModel(cfg).eval()


def tiny_bert_cls():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def word_tokenizer():
    """A word-level fast tokenizer over the tiny models' 64 ids: "w0".."w60" are ids 3..63
    ([PAD]=0, [UNK]=1, [EOS]=2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{f"w{i}": i + 3 for i in range(61)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def tiny_mlp():
    torch.manual_seed(0)
    return MLP().eval()


def tiny_conv():
    torch.manual_seed(0)
    return ConvNet().eval()


def ids_input(batch=2, seq=7, vocab=20):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (batch, seq), generator=g)


# name -> (constructor, input maker, output getter)
MODELS = {
    "mlp": (tiny_mlp, lambda: (ids_input(),), lambda o: o),
    "conv": (tiny_conv, lambda: (torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1)),), lambda o: o),
    "llama": (tiny_llama, lambda: (ids_input(vocab=64),), lambda o: o.logits),
    "bert": (tiny_bert, lambda: (ids_input(vocab=64),), lambda o: o.last_hidden_state),
    "gpt2": (tiny_gpt2, lambda: (ids_input(vocab=64),), lambda o: o.logits),
}


def run(model, name):
    _, mk, get = MODELS[name]
    return get(model(*mk()))


@pytest.fixture(params=list(MODELS))
def model_name(request):
    return request.param


@pytest.fixture
def one_thread():
    """bitsandbytes' CPU kernels open an OpenMP region per call; on this shared 2-core machine
    each region waits tens of ms for a second core, so quantized models are tested on one thread.
    Quantization test modules use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    """bf16 is the costly dtype on CPUs without AMX (a bf16 matmul ran ~150x slower than fp32 on
    one EPYC here): the dtype matrix keeps bf16 on the Llama model in every run and moves the
    other bf16 cells to the full matrices (`make test-matrix`); fp16 exercises the same rule."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.originalname == "test_trains_saves_merges_in_dtype" and params.get("dtype_name") == "bf16" \
                and params.get("model_name") != "llama":
            item.add_marker(pytest.mark.matrix)
            item.add_marker(pytest.mark.slow)
