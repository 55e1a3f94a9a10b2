"""How an instruction (and, for chat rows, a system prompt and earlier turns) becomes the text
in front of a response, for the sft and dpo tasks. Device side: plain string formatting.

The exporter derives the format from the tokenizer's chat template when it has one
(`derive_chat_format`, host side: needs transformers' jinja rendering) and stores the pieces in
the artifact's manifest, so devices need no jinja and no transformers.
"""
from __future__ import annotations

import string
from dataclasses import asdict, dataclass

__all__ = ["PromptFormat", "ALPACA", "check_template", "derive_chat_format"]

# Alpaca-style format for tokenizers without a chat template (the tiny test model).
_ALPACA_USER = "### Instruction:\n{content}\n\n"
_ALPACA_ASSISTANT_PREFIX = "### Response:\n"


def check_template(template: str, required: set[str], allowed: set[str], what: str) -> None:
    """A template uses exactly the placeholders a task fills: a typo like {txt} would otherwise
    fail on the device, and a missing {text} would train on the template alone."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise ValueError(f"{what} {template!r} is not a valid format string ({err}); "
                         "write literal braces as {{ and }}") from None
    unknown = sorted(set(names) - allowed)
    if unknown:
        raise ValueError(f"{what} {template!r} uses unknown placeholder(s) {unknown}; "
                         f"allowed: {sorted('{' + a + '}' for a in allowed)}")
    missing = sorted(required - set(names))
    if missing:
        raise ValueError(f"{what} {template!r} lacks {sorted('{' + m + '}' for m in missing)}")
    for name in set(names):
        if names.count(name) > 1:
            raise ValueError(f"{what} {template!r} uses {{{name}}} more than once")


@dataclass(frozen=True)
class PromptFormat:
    """Role wrappers with a {content} slot; `assistant_prefix` opens the answer (the generation
    prompt) and `response_suffix` closes it (trained on, so the model learns to stop)."""
    system: str = ""
    user: str = _ALPACA_USER
    assistant_prefix: str = _ALPACA_ASSISTANT_PREFIX
    response_suffix: str = ""
    default_prefix: str = ""   # what the template puts first when the row has no system prompt
    template: str = ""         # a user --template with {instruction} [and {input}]: replaces `user`

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PromptFormat":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def user_turn(self, instruction: str, input: str = "") -> str:
        if self.template:
            if "{input}" in self.template:
                return self.template.format(instruction=instruction, input=input)
            instruction = f"{instruction}\n\n{input}" if input else instruction
            return self.template.format(instruction=instruction)
        content = f"{instruction}\n\n{input}" if input else instruction
        return self.user.format(content=content)

    def prompt(self, instruction: str, input: str = "", system: str = "",
               history: tuple[tuple[str, str], ...] = ()) -> str:
        """Everything before the response: (system or default) + earlier turns + the last user
        turn + the assistant prefix."""
        head = self.system.format(content=system) if (system and self.system) else self.default_prefix
        parts = [head]
        for role, content in history:
            if role == "user":
                parts.append(self.user_turn(content))
            else:
                parts.append(self.assistant_prefix + content + self.response_suffix)
        parts.append(self.user_turn(instruction, input))
        parts.append(self.assistant_prefix)
        return "".join(parts)


ALPACA = PromptFormat()


def derive_chat_format(hf_tokenizer, template: str | None = None) -> PromptFormat:
    """The tokenizer's chat template taken apart into role wrappers (host side).

    Renders conversations with marker contents and diffs them; then checks the pieces rebuild a
    two-turn conversation exactly. Templates that are not a plain concatenation of turns (they
    rewrite earlier turns, say) are refused with a pointer to --template."""
    eos = getattr(hf_tokenizer, "eos_token", None) or ""
    if template is not None:
        check_template(template, {"instruction"}, {"instruction", "input"}, "sft/dpo --template")
        return PromptFormat(template=template, assistant_prefix="", response_suffix=eos)
    if not getattr(hf_tokenizer, "chat_template", None):
        return PromptFormat(response_suffix=eos)

    def render(msgs, gen=False):
        return hf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    S, U, A = "@@SYSTEM@@", "@@USER@@", "@@ASSISTANT@@"
    sys_only = render([{"role": "system", "content": S}])
    su = render([{"role": "system", "content": S}, {"role": "user", "content": U}])
    su_gen = render([{"role": "system", "content": S}, {"role": "user", "content": U}], gen=True)
    sua = render([{"role": "system", "content": S}, {"role": "user", "content": U},
                  {"role": "assistant", "content": A}])
    u_only = render([{"role": "user", "content": U}])
    ok = su.startswith(sys_only) and su_gen.startswith(su) and sua.startswith(su)
    if ok:
        fmt = PromptFormat(
            system=sys_only.replace(S, "{content}"),
            user=su[len(sys_only):].replace(U, "{content}"),
            assistant_prefix=su_gen[len(su):],
            response_suffix=sua[len(su):].split(A, 1)[-1] if A in sua else "",
        )
        # Whatever the template emits before the user turn when a row has no system prompt.
        user_turn = fmt.user.replace("{content}", U)
        ok = user_turn in u_only
        fmt = PromptFormat(**{**fmt.to_dict(), "default_prefix": u_only[:u_only.find(user_turn)]})
        asst = sua[len(su):]
        ok = ok and asst == fmt.assistant_prefix + A + fmt.response_suffix and "{content}" in fmt.user
    if ok:  # rebuild a two-turn conversation and compare with the template's own rendering
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
        want = render(msgs, gen=True)
        got = fmt.prompt("2+2?", system="Be brief.", history=(("user", "Hi"), ("assistant", "Hello.")))
        ok = want == got
    if not ok:
        raise ValueError("the tokenizer's chat template is not a plain concatenation of turns; "
                         "pass --template with {instruction} (and optionally {input}) instead")
    return fmt
