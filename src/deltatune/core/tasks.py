"""What a transformers model does, read from its class name (``LlamaForCausalLM`` -> "causal-lm"):
the one table deltatune's task names, peft's ``task_type`` and the classification heads come from.
"""
from __future__ import annotations

from torch import nn

# class-name suffix -> deltatune's name for the task; the suffix that ends the name decides
TASK_BY_CLASS_SUFFIX = {
    "ForSequenceClassification": "classify",
    "ForCausalLM": "causal-lm",
    "LMHeadModel": "causal-lm",  # GPT-2's GPT2LMHeadModel and relatives
    "ForImageClassification": "image-classify",
    "ForTokenClassification": "token-classify",
    "ForAudioClassification": "audio-classify",
    "ForMultipleChoice": "multiple-choice",
    "ForQuestionAnswering": "question-answering",
}
# peft's task_type (peft picks its model wrapper with it); other tasks are FEATURE_EXTRACTION
PEFT_TASK_TYPES = {"causal-lm": "CAUSAL_LM", "classify": "SEQ_CLS", "token-classify": "TOKEN_CLS",
                   "question-answering": "QUESTION_ANS"}
# tasks whose head transformers initialises fresh on top of a pretrained body: it trains in full
CLASSIFIER_TASKS = ("classify", "token-classify", "image-classify", "audio-classify", "multiple-choice")


def task_of(model: nn.Module | type | str) -> str | None:
    """The task of a model, a model class or a class name; None when the name says nothing."""
    name = model if isinstance(model, str) else (model if isinstance(model, type) else type(model)).__name__
    return next((t for suffix, t in TASK_BY_CLASS_SUFFIX.items() if name.endswith(suffix)), None)
