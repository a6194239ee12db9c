"""A tiny random LLaMA model and word-level tokenizer, for tests that must not download anything.

``save_tiny_llama(folder)`` writes an ordinary Hugging Face folder (config, safetensors,
tokenizer) that ``fptq_onnx.export.export_model`` accepts like a prepared recipe; it exports in
seconds. The tokenizer splits on whitespace and knows :data:`WORDS`; with ``bos=True`` it puts
``<bos>`` in front of every text, as Gemma-3's does. ``tokenizer="bpe"`` saves a byte-level BPE
tokenizer instead (GPT-2's and SmolLM2's kind, learned on :data:`WORDS`): onnxruntime-genai's
tokenizer reads that kind and not a word-level one.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

SPECIAL = ("<unk>", "<bos>", "<eos>")
WORDS = tuple("the a cat dog sat ran on under mat log and but quickly slowly , . said far near big".split())
BOS_ID = SPECIAL.index("<bos>")


def save_tiny_tokenizer(folder: str | Path, bos: bool = False, kind: str = "words") -> Path:
    """Save a tokenizer into ``folder``: ``kind="words"`` splits on whitespace (vocabulary
    ``SPECIAL + WORDS``); ``kind="bpe"`` is byte-level BPE with ``SPECIAL`` first, the symbols of
    printable ASCII, space and newline, and merges learned on :func:`tiny_text` until every word of
    :data:`WORDS` is one token (other bytes have no token: ASCII text only)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "words":
        vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
        backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    elif kind == "bpe":
        backend = Tokenizer(models.BPE(unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        # the symbols of printable ASCII, space and newline (ByteLevel spells them Ġ and Ċ): any
        # ASCII text has tokens, and every token decodes to valid UTF-8 on its own
        ascii_symbols = [chr(c) for c in range(0x21, 0x7F)] + ["Ġ", "Ċ"]
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(SPECIAL), show_progress=False,
                                      initial_alphabet=ascii_symbols)
        backend.train_from_iterator([tiny_text(2000, seed=seed) for seed in range(3)], trainer)
    else:
        raise ValueError(f"tokenizer kind must be 'words' or 'bpe', got {kind!r}")
    if bos:
        # The post-processor is where fast tokenizers add special tokens; transformers keeps it.
        backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS_ID)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    return Path(folder)


def save_tiny_llama(folder: str | Path, bos: bool = False, seed: int = 0, num_hidden_layers: int = 2,
                    tokenizer: str = "words") -> Path:
    """Save a random ``LlamaForCausalLM`` (hidden 64, GQA 4/2 heads, tied embeddings) and its
    tokenizer (``tokenizer``: the ``kind`` of :func:`save_tiny_tokenizer`; the vocabulary is the
    tokenizer's)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    save_tiny_tokenizer(folder, bos, tokenizer)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(AutoTokenizer.from_pretrained(folder)), hidden_size=64, intermediate_size=128,
        num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=BOS_ID, eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # default init (std 0.02) gives near-uniform predictions; sharpen them
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    return Path(folder)


def tiny_text(n_words: int, seed: int = 0) -> str:
    """``n_words`` random words of :data:`WORDS`, separated by spaces."""
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, size=n_words))
