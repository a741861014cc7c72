"""Conversation templates, and tokenisation whose loss labels are built turn by turn.

The reference implementation renders a whole conversation to one string, tokenises it, then
guesses where each turn starts to mask it; a tokenizer that splits turns differently masks
everything and the loss is silently 0. Here each turn is rendered and tokenised as its own
piece, and the label of every token is decided as the piece is added: assistant replies (and
the end-of-turn marker after them) are learned, everything else is -100 *by construction*.

Three templates:

- ``plain`` (stage 1, as LLaVA-1.5's pretraining): ``<image>`` then the caption, nothing else;
- ``chat`` (stage 2): the language model's own chat template when its tokenizer has one,
  split into pieces by rendering growing prefixes of the conversation;
- ``roles``: the tiny LM's chat layout written piece by piece (its pretraining documents).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache
from html import escape as html_escape

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
IGNORE = -100
# the role tokens of the tiny LM's chat layout (see RoleTokenTemplate)
USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"
ROLE_TOKENS = (USER, ASSISTANT, END)
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


class TemplateError(ValueError):
    """A conversation or a chat template that cannot be tokenised as asked."""


@dataclass
class Encoded:
    """One tokenised sample. ``image_positions`` are the indices of the ``<image>`` token."""

    input_ids: list[int]
    labels: list[int]
    sample_id: str = ""
    image_positions: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


def to_messages(conversations: list[dict], sample_id: str = "") -> list[dict]:
    """LLaVA turns (``from``/``value``) to chat messages (``role``/``content``), checked."""
    messages = []
    for i, turn in enumerate(conversations):
        role = ROLES.get(turn.get("from"))
        if role is None:
            raise TemplateError(
                f"sample {sample_id}, turn {i}: unknown role {turn.get('from')!r} (expected human or gpt)"
            )
        messages.append({"role": role, "content": turn["value"]})
    roles = [m["role"] for m in messages if m["role"] != "system"]
    if roles[::2] != ["user"] * len(roles[::2]) or roles[1::2] != ["assistant"] * len(roles[1::2]):
        raise TemplateError(f"sample {sample_id}: turns must alternate human, gpt starting with human; found {roles}")
    return messages


class Template:
    """Turns LLaVA turns into ``(text, learned)`` pieces; :meth:`encode` tokenises them."""

    name = "template"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise TemplateError(
                f"the tokenizer has no {IMAGE_TOKEN} token: call model.add_image_token(tokenizer) first"
            )
        self._piece = lru_cache(maxsize=100_000)(self._tokenise)

    def _tokenise(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(text, add_special_tokens=False))

    def pieces(self, messages: list[dict], generation: bool = False) -> list[tuple[str, bool]]:
        raise NotImplementedError

    def encode(self, conversations: list[dict], sample_id: str = "") -> Encoded:
        messages = to_messages(conversations, sample_id)
        ids: list[int] = []
        labels: list[int] = []
        for text, learned in self.pieces(messages):
            toks = self._piece(text)
            ids += toks
            labels += toks if learned else [IGNORE] * len(toks)
        positions = [i for i, t in enumerate(ids) if t == self.image_token_id]
        for p in positions:
            labels[p] = IGNORE
        return Encoded(ids, labels, sample_id, positions)

    def prompt(self, conversations: list[dict], sample_id: str = "") -> list[int]:
        """Token ids of the conversation so far plus the assistant's opening, ready to generate."""
        messages = to_messages(conversations, sample_id)
        return [t for text, _ in self.pieces(messages, generation=True) for t in self._piece(text)]


class PlainTemplate(Template):
    """Stage 1: ``<image>`` and a newline, then the answer and the end-of-sequence token."""

    name = "plain"

    def pieces(self, messages, generation=False):
        if generation:
            return [(IMAGE_TOKEN + "\n", False)]
        answer = next((m["content"] for m in messages if m["role"] == "assistant"), None)
        if answer is None:
            raise TemplateError("the plain template needs one assistant turn (the caption)")
        eos = self.tokenizer.eos_token or ""
        return [(IMAGE_TOKEN + "\n", False), (answer + eos, True)]


class ChatTemplate(Template):
    """Stage 2: the tokenizer's own chat template, cut into one piece per turn.

    Rendering the first k messages for k = 1, 2, ... must give strings that extend each other
    (true of the Llama, Qwen, SmolLM and our tiny templates); the text each message adds is its
    piece. For an assistant message the piece is split once more: its opening (what
    ``add_generation_prompt`` renders) is not learned, the rest (reply and end-of-turn) is.
    """

    name = "chat"

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError("this tokenizer has no chat_template; use the plain template or give it one")

    def _render(self, messages, generation=False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    def pieces(self, messages, generation=False):
        out: list[tuple[str, bool]] = []
        done = ""
        for k, m in enumerate(messages):
            if m["role"] == "assistant":
                opened = self._render(messages[:k], generation=True)
                self._check_prefix(done, opened, k)
                out.append((opened[len(done) :], False))
                done = opened
            text = self._render(messages[: k + 1])
            self._check_prefix(done, text, k)
            out.append((text[len(done) :], m["role"] == "assistant"))
            done = text
        if generation:
            opened = self._render(messages, generation=True)
            self._check_prefix(done, opened, len(messages))
            out.append((opened[len(done) :], False))
        return [(t, learned) for t, learned in out if t]

    @staticmethod
    def _check_prefix(done: str, text: str, k: int) -> None:
        if not text.startswith(done):
            raise TemplateError(
                f"the chat template is not prefix-stable at message {k}: rendering one more message changed "
                f"earlier text ({done[-40:]!r} -> {text[len(done) - 40 : len(done)]!r}); "
                "labels cannot be built per turn"
            )


class RoleTokenTemplate(Template):
    """The tiny LM's chat layout written out piece by piece, without rendering a Jinja template:
    ``<|user|>{content}<|end|><|assistant|>{reply}<|end|>``, a system message as plain text and a
    newline. Its tokens equal those of the tiny LM's own ``chat_template`` (a test checks this);
    its pieces repeat from document to document, so tokenising many documents stays cheap."""

    name = "roles"

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        missing = [t for t in ROLE_TOKENS if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
        if missing:
            raise TemplateError(f"the roles template needs the special tokens {missing}, which this tokenizer lacks")

    def pieces(self, messages, generation=False):
        out: list[tuple[str, bool]] = []
        for m in messages:
            if m["role"] == "system":
                out.append((m["content"] + "\n", False))
            elif m["role"] == "user":
                out += [(USER, False), (m["content"], False), (END, False)]
            else:
                out += [(ASSISTANT, False), (m["content"], True), (END, True)]
        if generation:
            out.append((ASSISTANT, False))
        return out


TEMPLATES = {"plain": PlainTemplate, "chat": ChatTemplate, "roles": RoleTokenTemplate}


def get_template(name: str, tokenizer) -> Template:
    try:
        return TEMPLATES[name](tokenizer)
    except KeyError:
        raise TemplateError(f"unknown template {name!r}; expected one of {sorted(TEMPLATES)}") from None


def fit(enc: Encoded, max_len: int, num_image_tokens: int, template: Template) -> Encoded | None:
    """``enc`` cut to ``max_len`` tokens *after* each ``<image>`` grows to ``num_image_tokens``.

    The cut falls at a turn boundary (after the last assistant reply that fits), never through the
    image tokens; a sample whose first reply does not fit returns ``None`` (the caller counts it).
    """
    grow = len(enc.image_positions) * (num_image_tokens - 1)
    if len(enc) + grow <= max_len:
        return enc
    limit = max_len - grow
    # turn boundaries: positions just after a learned run ends
    ends = [
        i + 1
        for i in range(len(enc.labels))
        if enc.labels[i] != IGNORE and (i + 1 == len(enc.labels) or enc.labels[i + 1] == IGNORE)
    ]
    ends = [e for e in ends if e <= limit and all(p < e for p in enc.image_positions)]
    if not ends:
        return None
    cut = ends[-1]
    return Encoded(enc.input_ids[:cut], enc.labels[:cut], enc.sample_id, enc.image_positions)


def show_masked(tokenizer, enc: Encoded, html: bool = False) -> str:
    """The tokenised sample with what carries no loss visibly marked.

    Plain text: masked stretches in ``[[...]]``, learned text as is. ``html=True`` gives grey for
    masked, bold green for learned (for notebooks: ``IPython.display.HTML``).
    """
    out, run, run_learned = [], [], None

    def flush():
        if not run:
            return
        text = tokenizer.decode(run, skip_special_tokens=False)
        if html:
            style = "color:#1a7f37;font-weight:bold" if run_learned else "color:#999"
            out.append(f'<span style="{style}">{html_escape(text)}</span>')
        else:
            out.append(text if run_learned else f"[[{text}]]")

    for tok, lab in zip(enc.input_ids, enc.labels):
        learned = lab != IGNORE
        if learned != run_learned:
            flush()
            run, run_learned = [], learned
        run.append(tok)
    flush()
    body = "".join(out)
    return f'<pre style="white-space:pre-wrap">{body}</pre>' if html else body


def expand_image(enc: Encoded, num_image_tokens: int) -> Encoded:
    """Each ``<image>`` becomes ``num_image_tokens`` placeholders (labels -100), one per patch token."""
    if not enc.image_positions:
        return enc
    ids, labels, positions = [], [], []
    image_id = enc.input_ids[enc.image_positions[0]]
    for tok, lab in zip(enc.input_ids, enc.labels):
        if tok == image_id:
            positions.append(len(ids))
            ids += [tok] * num_image_tokens
            labels += [IGNORE] * num_image_tokens
        else:
            ids.append(tok)
            labels.append(lab)
    return Encoded(ids, labels, enc.sample_id, positions)
