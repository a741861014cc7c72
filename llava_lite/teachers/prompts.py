"""The chat teacher's prompts, read from data files: one folder per response type.

``data/prompts/<type>/`` holds ``system.txt`` (the task), ``few_shot.json`` (a list of
``{"context", "response"}`` examples, written by hand) and, for ``detail``, ``instructions.txt``
(the human questions a description answers, one a line). The paper's method turns them into
one request: the system message, each example as a user (context) / assistant (response)
pair, then the new context as the last user message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import io
from ..paths import PROMPTS_DIR

RESPONSE_TYPES = ("conversation", "detail", "complex")


@dataclass(frozen=True)
class PromptSet:
    type: str
    system: str
    examples: tuple[tuple[str, str], ...]  # (context, response) pairs
    instructions: tuple[str, ...] = ()  # detail only: the human turn a description answers

    def messages(self, context: str) -> list[dict[str, str]]:
        """The chat-completions ``messages`` for one context."""
        msgs = [{"role": "system", "content": self.system}]
        for ctx, response in self.examples:
            msgs += [{"role": "user", "content": ctx}, {"role": "assistant", "content": response}]
        msgs.append({"role": "user", "content": context})
        return msgs


def load_prompts(rtype: str, prompts_dir: str | Path = PROMPTS_DIR) -> PromptSet:
    """Read one response type's prompt files; a missing or malformed file names itself."""
    if rtype not in RESPONSE_TYPES:
        raise ValueError(f"unknown response type {rtype!r}; expected one of {RESPONSE_TYPES}")
    folder = Path(prompts_dir) / rtype
    system_path, shots_path = folder / "system.txt", folder / "few_shot.json"
    if not system_path.is_file():
        raise FileNotFoundError(f"{system_path}: the {rtype} system message is missing")
    system = system_path.read_text(encoding="utf-8").strip()
    if not system:
        raise ValueError(f"{system_path}: empty system message")
    shots = io.read_json(shots_path)
    if not isinstance(shots, list):
        raise ValueError(f"{shots_path}: expected a list of examples, found {type(shots).__name__}")
    examples = []
    for i, shot in enumerate(shots):
        if not (
            isinstance(shot, dict) and isinstance(shot.get("context"), str) and isinstance(shot.get("response"), str)
        ):
            raise ValueError(
                f"{shots_path}: example {i} should be {{'context': str, 'response': str}}, found {shot!r:.80}"
            )
        examples.append((shot["context"].strip(), shot["response"].strip()))
    instructions: tuple[str, ...] = ()
    if rtype == "detail":
        path = folder / "instructions.txt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the detail instructions are missing")
        instructions = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
        if not instructions:
            raise ValueError(f"{path}: no instructions (one a line expected)")
    return PromptSet(rtype, system, tuple(examples), instructions)
