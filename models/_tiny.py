"""A tiny random LLaMA model and word-level tokenizer, for tests that must not download anything.

``save_tiny_llama(folder)`` writes an ordinary Hugging Face folder (config, safetensors,
tokenizer) that ``fptq_onnx.export.export_model`` accepts like a prepared recipe; it exports in
seconds. The tokenizer splits on whitespace and knows :data:`WORDS`; with ``bos=True`` it puts
``<bos>`` in front of every text, as Gemma-3's does.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

SPECIAL = ("<unk>", "<bos>", "<eos>")
WORDS = tuple("the a cat dog sat ran on under mat log and but quickly slowly , . said far near big".split())
BOS_ID = SPECIAL.index("<bos>")


def save_tiny_tokenizer(folder: str | Path, bos: bool = False) -> Path:
    """Save a whitespace word-level tokenizer (vocabulary ``SPECIAL + WORDS``) into ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        # The post-processor is where fast tokenizers add special tokens; transformers keeps it.
        backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS_ID)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    return Path(folder)


def save_tiny_llama(folder: str | Path, bos: bool = False, seed: int = 0, num_hidden_layers: int = 2) -> Path:
    """Save a random ``LlamaForCausalLM`` (hidden 64, GQA 4/2 heads, tied embeddings) and its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(SPECIAL) + len(WORDS), hidden_size=64, intermediate_size=128,
        num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=BOS_ID, eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # default init (std 0.02) gives near-uniform predictions; sharpen them
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    return save_tiny_tokenizer(folder, bos)


def tiny_text(n_words: int, seed: int = 0) -> str:
    """``n_words`` random words of :data:`WORDS`, separated by spaces."""
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, size=n_words))
