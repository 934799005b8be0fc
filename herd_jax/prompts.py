"""Prompt sets: built-in lists by name, or a text file with one prompt per line."""
from __future__ import annotations

import pathlib


class PromptError(ValueError):
    """A prompt source that yields no prompts; the message is one line for the user."""

# DDPO's "simple animals" prompt set (jannerm/ddpo, kvablack/ddpo-pytorch assets).
ANIMALS = (
    "cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox "
    "wolf lizard beetle ant butterfly fish shark whale dolphin squirrel mouse rat snake turtle frog "
    "chicken duck goose bee pig turkey fly llama camel bat gorilla hedgehog kangaroo"
).split()


def builtin_sets() -> tuple[str, ...]:
    return ("animals", "color")


def load_prompts(spec: str) -> list[str]:
    """Returns the prompt list named by `spec`: a built-in set or a path to a text file.

    Raises:
      PromptError: one line, when the file is missing, not UTF-8 text, or holds no prompts.
    """
    if spec == "animals":
        return list(ANIMALS)
    if spec == "color":
        from herd_jax.rewards.color import color_prompts

        return color_prompts()
    path = pathlib.Path(spec)
    if not path.is_file():
        raise PromptError(f"prompts {spec!r} is neither a built-in set ({', '.join(builtin_sets())}) nor a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PromptError(f"prompt file {spec} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); save it as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PromptError(f"prompt file {spec} holds no prompts (one per line expected)")
    return prompts
