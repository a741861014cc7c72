"""The tiny backbones' tokenizers: a byte-level BPE for the tiny LM, a word-level one for the tiny CLIP.

The tiny LM's BPE is trained on the world's text (scenes in both layouts, questions, answers,
captions) so that every word it reads is one token wherever it stands and every digit its own
token: a coordinate ``7`` is then one symbol to look up, never a piece of ``0.75``. Its chat
template writes the role tokens of :mod:`llava_lite.conversation`'s ``roles`` template.

The tiny CLIP's text is the world's ~80 words, so its tokenizer is one id per lower-cased word,
with ``<eos>`` after each text (where open_clip pools the text embedding).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from ..coco import SymbolicContext
from ..conversation import ASSISTANT, END, IMAGE_TOKEN, USER
from ..scene_text import object_lines, reading_context
from .documents import CAPTION_PROMPT, scene_questions

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", IMAGE_TOKEN, USER, ASSISTANT, END)

# roles user/assistant (and an optional leading system message, written as plain text)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}"
    + USER
    + "{{ message['content'] }}"
    + END
    + "{% elif message['role'] == 'assistant' %}"
    + ASSISTANT
    + "{{ message['content'] }}"
    + END
    + "{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)

# words (space-prefixed), single digits, punctuation runs (", " before a digit stays one piece),
# newlines, other whitespace
_PIECES = r" ?[A-Za-z]+|\d| ?[^\sA-Za-z\d]+(?: [^\sA-Za-z\d]+)*(?: (?=\d))?|\n|\s"

# the tiny CLIP's special words
PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"


# ------------------------------------------------------------------ the tiny LM
def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``, with :data:`CHAT_TEMPLATE`.

    Every word is space-prefixed (a word at the start of a line or of a turn gets a space too,
    so ``red`` is one token wherever it stands) and every digit is its own token.
    """
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.Replace("\n", "\n "), normalizers.Prepend(" ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PIECES), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=[IMAGE_TOKEN, USER, ASSISTANT, END],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tokenizer_corpus(contexts: Sequence[SymbolicContext], seed: int = 0, questions_per_scene: int = 6) -> Iterable[str]:
    """The text the BPE learns from: each scene in both layouts, its captions, and questions
    and answers about it."""
    rng = random.Random(seed)
    for ctx in contexts:
        yield object_lines(ctx)
        yield reading_context(ctx, "sized")
        yield from ctx.captions
        for qa in scene_questions(ctx, rng, questions_per_scene):
            yield qa.question
            yield qa.answer
    yield CAPTION_PROMPT


# ------------------------------------------------------------------ the tiny CLIP
def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A lower-cased word-level tokenizer over ``texts`` that appends ``<eos>``, as a HF fast tokenizer."""
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=[PAD, UNK, EOS], min_frequency=1))
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, tok.token_to_id(EOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK, eos_token=EOS)


def tokenize(tokenizer, texts: list[str], context_length: int) -> torch.Tensor:
    """``[N, context_length]`` ids, padded and truncated as open_clip's HFTokenizer does."""
    return tokenizer(
        texts, return_tensors="pt", max_length=context_length, padding="max_length", truncation=True
    ).input_ids
