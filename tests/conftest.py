"""Shared fixtures: tiny Hugging Face models with the built-in character tokenizer (random weights,
built in milliseconds), so stage tests run the real HF code path without the trained assets."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import LlamaForCausalLM

from opd.models import build_char_tokenizer
from opd.teacher.builtin import STUDENT_SHAPE, llama_config
from opd.types import Prompt

torch.set_num_threads(2)


@pytest.fixture
def fresh_kernel(monkeypatch):
    """monkeypatch, with opd's int8 kernel looked up again under the test's environment (OPD_INT8_KERNEL, CC,
    OPD_KERNEL_CACHE), and again after it."""
    from opd import cpu_kernels

    cpu_kernels._library.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    cpu_kernels._library.cache_clear()


@pytest.fixture(scope="session")
def tokenizer():
    return build_char_tokenizer()


def tiny_model(tokenizer, seed: int, **shape):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(tokenizer, {**STUDENT_SHAPE, **shape}))
    return model.eval()


@pytest.fixture
def student(tokenizer):
    return tiny_model(tokenizer, 0)


@pytest.fixture
def teacher_model(tokenizer):
    return tiny_model(tokenizer, 1, hidden_size=32, num_hidden_layers=1)


@pytest.fixture
def prompts():
    texts = ["12+345=", "9+9=", "1234+5678=", "7+80=", "abc", "55555+1="]
    return [Prompt(text=t, source="t") for t in texts]
