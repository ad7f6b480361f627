"""Prompt templates for math problems: the TOPD paper's plain prompt and Qwen ChatML.

Teacher and student must see the same prompt; a run records ``PromptTemplate.to_dict()``.

- ``paper``: ``"Question: {problem}\\nAnswer:"`` (TOPD paper, evaluation section).
- ``qwen-chat``: ChatML as documented for Qwen2.5 / Qwen3::

      <|im_start|>system\\n{system}<|im_end|>\\n          (only when a system prompt is given)
      <|im_start|>user\\n{problem}\\n{instruction}<|im_end|>\\n
      <|im_start|>assistant\\n
      <think>\\n\\n</think>\\n\\n                           (only for Qwen3 with thinking off)

  ``instruction`` defaults to Qwen's recommended math instruction, which asks for the final
  answer in ``\\boxed{}``. Thinking on (the default) adds nothing after the assistant header:
  the model opens its own ``<think>`` block, exactly as Qwen3's template with
  ``enable_thinking=True``; Qwen2.5 prompts are the same text. Qwen2.5-Instruct's own
  template inserts ``QWEN25_DEFAULT_SYSTEM`` when no system message is given: pass it as
  ``system`` to reproduce that.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

TEMPLATE_NAMES = ("paper", "qwen-chat")
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
EMPTY_THINK_BLOCK = "<think>\n\n</think>\n\n"
# End-of-turn tokens of Qwen2.5/Qwen3 (their generation_config eos ids 151645, 151643); used as
# stop tokens under both templates: a chat-tuned model ends with <|im_end|> even when given
# the paper prompt.
QWEN_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
_ROLES = ("system", "user", "assistant")


def paper_prompt(problem: str) -> str:
    """The TOPD paper's evaluation prompt."""
    return f"Question: {problem}\nAnswer:"


def render_chatml(
    messages: Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = True,
    thinking: bool = True,
) -> str:
    """Render ``[{"role": ..., "content": ...}, ...]`` in Qwen's ChatML.

    ``add_generation_prompt`` appends the assistant header; ``thinking=False`` then also
    appends the empty think block that switches Qwen3's reasoning off.
    """
    parts = []
    for i, msg in enumerate(messages):
        if set(msg) != {"role", "content"} or msg["role"] not in _ROLES:
            raise ValueError(
                f"message {i} must be {{'role': one of {_ROLES}, 'content': str}},"
                f" got {dict(msg)!r}"
            )
        parts.append(f"<|im_start|>{msg['role']}\n{msg['content']}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
        if not thinking:
            parts.append(EMPTY_THINK_BLOCK)
    elif not thinking:
        raise ValueError("thinking=False only applies with add_generation_prompt=True")
    return "".join(parts)


def qwen_chat_prompt(
    problem: str,
    *,
    thinking: bool = True,
    system: str | None = None,
    instruction: str = BOXED_INSTRUCTION,
) -> str:
    """A Qwen ChatML prompt for one math problem (see module docstring)."""
    messages = [] if system is None else [{"role": "system", "content": system}]
    user = f"{problem}\n{instruction}" if instruction else problem
    messages.append({"role": "user", "content": user})
    return render_chatml(messages, add_generation_prompt=True, thinking=thinking)


@dataclass(frozen=True)
class PromptTemplate:
    """A named prompt format, recorded with every run (``to_dict``).

    name: ``"paper"`` or ``"qwen-chat"``. thinking/system/instruction: qwen-chat only
    (the paper template takes none of them).
    """

    name: str
    thinking: bool = True
    system: str | None = None
    instruction: str = BOXED_INSTRUCTION

    def __post_init__(self):
        if self.name not in TEMPLATE_NAMES:
            raise ValueError(f"unknown template {self.name!r}; choose one of {TEMPLATE_NAMES}")
        if self.name == "paper" and (
            not self.thinking or self.system is not None or self.instruction != BOXED_INSTRUCTION
        ):
            raise ValueError(
                "the paper template is fixed ('Question: {problem}\\nAnswer:'): thinking,"
                f" system and instruction apply to qwen-chat only, got {self}"
            )

    def format(self, problem: str) -> str:
        if self.name == "paper":
            return paper_prompt(problem)
        return qwen_chat_prompt(
            problem, thinking=self.thinking, system=self.system, instruction=self.instruction
        )

    @property
    def stop_tokens(self) -> tuple[str, ...]:
        return QWEN_STOP_TOKENS

    def to_dict(self) -> dict:
        """What a run records: the settings and an example rendering."""
        d = asdict(self)
        if self.name == "paper":
            d = {"name": "paper"}
        d["example"] = self.format("{problem}")
        d["stop_tokens"] = list(self.stop_tokens)
        return d


def stop_token_ids(tokenizer, template: PromptTemplate) -> list[int]:
    """Ids of the template's stop tokens that ``tokenizer`` (a transformers tokenizer) knows,
    plus its eos id; a ``ValueError`` when it knows none."""
    ids = []
    unk = tokenizer.unk_token_id
    for tok in template.stop_tokens:
        i = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(i, int) and i != unk and i not in ids:
            ids.append(i)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError(f"the tokenizer knows none of the stop tokens {template.stop_tokens}")
    return ids


# ---------------------------------------------------------------------------
# TAPO's synthesis prompt for math problems (our own wording)
# ---------------------------------------------------------------------------

_SYNTHESIS_TEMPLATE = """\
Below are a math problem and two attempts at it. Attempt A reaches a wrong answer; \
attempt B reaches the correct one.

### Problem
{problem}

### Attempt A (incorrect)
{wrong}

### Attempt B (correct)
{right}

### Your task
Find the first step where attempt A goes wrong, then write a repaired version of \
attempt A. Answer in exactly this format and write nothing after it:

<analysis>
Name the first critical error in attempt A: quote the step and say what is wrong with it.
</analysis>
<reconstruction>
Copy attempt A word for word from its beginning up to and including the step that \
contains the error. Then write a short phrase that notices the mistake (for example \
"Wait, that step is wrong."), and continue with correct reasoning, using attempt B as \
a guide, until you reach the final answer, written as \\boxed{{answer}}.
</reconstruction>"""


def math_synthesis_prompt(problem: str, wrong: str, right: str) -> str:
    """The construction request given to the policy (TAPO step 4); our wording, not the
    paper's. The reply format is the one ``algorithms.tapo_construct.parse_construction`` accepts."""
    return _SYNTHESIS_TEMPLATE.format(problem=problem.strip(), wrong=wrong.strip(),
                                      right=right.strip())
