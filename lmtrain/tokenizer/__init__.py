"""Byte-level BPE: a trainer (`train_bpe`) and a tokenizer (`Tokenizer`) interchangeable with Hugging Face.

from lmtrain.tokenizer import Tokenizer, train_bpe
vocab, merges = train_bpe("corpus.txt", 8192, ["<|endoftext|>"])
tok = Tokenizer(vocab, merges, ["<|endoftext|>"])
tok.save("out/tokenizer.json")  # loadable by tokenizers.Tokenizer.from_file
"""

from lmtrain.tokenizer.tokenizer import Tokenizer
from lmtrain.tokenizer.trainer import train_bpe

__all__ = ["Tokenizer", "train_bpe"]
