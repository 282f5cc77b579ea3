"""Gemma's chat template (engines/gemma.py), rendered as transformers renders it: Gemma 3's published turn format
("Prompt formatting" in Gemma's docs) with every line break, the assistant called "model", system text before the
first user turn's."""

from gridserve.engines.gemma import GEMMA_CHAT_TEMPLATE


def _render(messages: list[dict[str, str]]) -> str:
    from transformers.utils.chat_template_utils import (
        render_jinja_template,
    )  # here: ~0.3 s of every worker's collection

    rendered, _ = render_jinja_template(
        conversations=[messages], chat_template=GEMMA_CHAT_TEMPLATE, add_generation_prompt=True, bos_token="<bos>"
    )
    return str(rendered[0])


def test_a_conversation_renders_in_gemmas_published_format() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there "},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Why?"},
    ]
    assert _render(messages) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n"
        "<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nWhy?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_one_question_is_one_turn_and_the_reply_opened() -> None:
    assert _render([{"role": "user", "content": "What is 2+2?"}]) == (
        "<bos><start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"
    )
