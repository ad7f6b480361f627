"""Prompt templates: the paper's plain prompt and Qwen ChatML (thinking on/off), as text and
as Qwen token ids."""

import pytest

from topd_jax.data.templates import (
    BOXED_INSTRUCTION,
    EMPTY_THINK_BLOCK,
    QWEN25_DEFAULT_SYSTEM,
    PromptTemplate,
    paper_prompt,
    qwen_chat_prompt,
    render_chatml,
    stop_token_ids,
)
from topd_jax.data.tokenizer import build_qwen_tokenizer

PROBLEM = "What is $1+1$?"


def test_paper_prompt_is_question_answer():
    assert paper_prompt(PROBLEM) == "Question: What is $1+1$?\nAnswer:"
    assert PromptTemplate("paper").format(PROBLEM) == paper_prompt(PROBLEM)


def test_qwen_chat_thinking_on_ends_at_assistant_header():
    expected = (
        "<|im_start|>user\nWhat is $1+1$?\n"
        "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert qwen_chat_prompt(PROBLEM) == expected
    assert PromptTemplate("qwen-chat").format(PROBLEM) == expected


def test_qwen3_thinking_off_appends_an_empty_think_block():
    on = qwen_chat_prompt(PROBLEM, thinking=True)
    off = qwen_chat_prompt(PROBLEM, thinking=False)
    assert EMPTY_THINK_BLOCK == "<think>\n\n</think>\n\n"
    assert off == on + EMPTY_THINK_BLOCK
    assert PromptTemplate("qwen-chat", thinking=False).format(PROBLEM) == off


def test_system_message_comes_first():
    text = qwen_chat_prompt(PROBLEM, system=QWEN25_DEFAULT_SYSTEM)
    assert text.startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful"
        " assistant.<|im_end|>\n<|im_start|>user\n"
    )


def test_chat_prompt_asks_for_a_boxed_answer():
    assert "\\boxed{}" in BOXED_INSTRUCTION
    assert BOXED_INSTRUCTION in qwen_chat_prompt(PROBLEM)


def test_render_chatml_multi_turn_without_generation_prompt():
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert render_chatml(msgs, add_generation_prompt=False) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    )


@pytest.mark.parametrize(
    "msg", [{"role": "tool", "content": "x"}, {"role": "user"}, {"role": "user", "content": "x", "n": 1}]
)
def test_render_chatml_rejects_bad_messages_naming_them(msg):
    with pytest.raises(ValueError, match="message 0"):
        render_chatml([msg])


def test_unknown_template_and_paper_options_are_errors():
    with pytest.raises(ValueError, match="unknown template 'chatml'"):
        PromptTemplate("chatml")
    with pytest.raises(ValueError, match="qwen-chat only"):
        PromptTemplate("paper", thinking=False)
    with pytest.raises(ValueError, match="qwen-chat only"):
        PromptTemplate("paper", system="be brief")


def test_template_record_names_settings_and_shows_the_format():
    rec = PromptTemplate("qwen-chat", thinking=False).to_dict()
    assert rec["name"] == "qwen-chat" and rec["thinking"] is False and rec["system"] is None
    assert rec["example"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert rec["stop_tokens"] == ["<|im_end|>", "<|endoftext|>"]
    assert PromptTemplate("paper").to_dict()["example"] == "Question: {problem}\nAnswer:"


@pytest.fixture(scope="module")
def qwen_tok():
    return build_qwen_tokenizer()


def test_chat_prompt_tokenizes_with_qwen_special_ids(qwen_tok):
    ids = qwen_tok.encode(qwen_chat_prompt("2+2?", thinking=False), add_special_tokens=False)
    # <|im_start|> user \n ... <|im_end|> \n <|im_start|> assistant \n <think> \n\n </think> \n\n
    assert ids[:3] == [151644, 872, 198]
    assert ids[-9:] == [151645, 198, 151644, 77091, 198, 151667, 271, 151668, 271]
    assert qwen_tok.decode(ids) == qwen_chat_prompt("2+2?", thinking=False)


def test_stop_token_ids_are_im_end_then_endoftext_for_qwen(qwen_tok):
    assert stop_token_ids(qwen_tok, PromptTemplate("qwen-chat")) == [151645, 151643]


class _NoStopTokens:
    unk_token_id, eos_token_id = 0, None

    def convert_tokens_to_ids(self, tok):
        return self.unk_token_id


def test_stop_token_ids_refuses_a_tokenizer_that_knows_none():
    with pytest.raises(ValueError, match="im_end"):
        stop_token_ids(_NoStopTokens(), PromptTemplate("paper"))
