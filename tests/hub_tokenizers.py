"""Hub-style tokenizers built locally (no download), for tests and benches: a GPT-2/Qwen-style
byte-level BPE and a Llama/Mistral-style SentencePiece BPE with byte fallback, as transformers'
fast tokenizers."""

from __future__ import annotations

from typing import Any

CORPUS = [
    "Hello world, the quick brown fox jumps over the lazy dog.",
    "Grüße aus Köln: naïve café, 漢字と仮名, emoji 🙂🚀 and ümlauts.",
    "def f(x):\n    return x ** 2  # tabs\tand  double  spaces",
] * 20


def byte_level_bpe_model() -> Any:
    """A GPT-2/Qwen-style tokenizer: byte-level BPE (a character may span several tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        show_progress=False,
        special_tokens=["<|endoftext|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def metaspace_byte_fallback_model() -> Any:
    """A Llama/Mistral-style tokenizer: SentencePiece BPE with byte fallback and a leading "▁"."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    chars = sorted({c for line in CORPUS[:3] for c in line.replace(" ", "▁") if ord(c) < 0x250})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁", *chars, "▁t", "▁th", "▁the", "he", "ll", "llo", "▁w", "or"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "t"), ("▁t", "h"), ("▁th", "e"), ("h", "e"), ("l", "l"), ("ll", "o")]
    merges += [("▁", "w"), ("o", "r")]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(["<s>", "</s>"])
    return tok


def hub_tokenizer(style: str) -> Any:
    """ "byte_level_bpe" or "metaspace_byte_fallback", as a PreTrainedTokenizerFast that decodes
    with the Rust tokenizer alone (no space clean-up, as Qwen's, Llama's and Mistral's)."""
    from transformers import PreTrainedTokenizerFast

    build = {
        "byte_level_bpe": byte_level_bpe_model,
        "metaspace_byte_fallback": metaspace_byte_fallback_model,
    }
    fast = PreTrainedTokenizerFast(tokenizer_object=build[style]())
    fast.clean_up_tokenization_spaces = False
    return fast
