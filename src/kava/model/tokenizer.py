"""A small word/digit tokenizer for the embedded synthetic task, built offline.

It is a regular ``PreTrainedTokenizerFast``: the rest of kava treats it like any hub
tokenizer. Words and symbols keep a leading space inside the token (GPT style), digits
are single tokens, and decoding joins tokens back without adding anything.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PATTERN = r" ?[A-Za-z]+| ?\d| ?<<|>>| ?[^\sA-Za-z\d]|\s"
WORDS = (
    "The answer is what left start at then plus minus times divided by mod result of gives equals "
    "Question Answer Step so and we get compute first next finally"
).split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def build_synthetic_tokenizer(
    add_bos: bool = False, chars: bool = False, verbose: bool = False
) -> PreTrainedTokenizerFast:
    """A fixed-vocabulary tokenizer covering the synthetic task's text (and a little more).

    With ``verbose`` the vocabulary also holds the words of the verbose traces of
    ``synthetic-classes-nl`` (:data:`kava.data.synthetic.VERBOSE_WORDS`), appended after the
    others, so the ids of every other token stay as they are.

    With ``add_bos`` the tokenizer prepends ``<s>`` like Llama tokenizers do, which is
    how tests check that spans stay exact when a BOS is added. With ``chars`` every
    printable character is one token: a tokenizer with another vocabulary and other
    sequence lengths, for teachers that do not share the student's tokenizer.
    """
    pieces: list[str] = []
    if chars:
        pieces = list(string.printable)
    else:
        symbols = [c for c in string.punctuation if c not in "<>"] + ["<", ">", "<<", ">>"]
        for base in [*WORDS, *[w.lower() for w in WORDS], *string.digits, *symbols]:
            pieces += [base, " " + base]
        pieces += ["\n", " ", "\t"]
        if verbose:
            from ..data.synthetic import VERBOSE_WORDS

            for base in VERBOSE_WORDS:
                pieces += [base, " " + base]
    vocab: dict[str, int] = {}
    for tok in [*SPECIALS, *pieces]:
        vocab.setdefault(tok, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]" if chars else PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()
    if add_bos:
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
