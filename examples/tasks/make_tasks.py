"""Regenerate the items of the two local lm-evaluation-harness tasks that ship here, from KJV Genesis.

    python examples/tasks/make_tasks.py        # rewrites examples/tasks/*.jsonl; the same bytes every time

Both tasks are drawn from the held-out part of the text: the last 10% that examples/study/train.py never
trains on (the same cut, after dropping the '#' lines), so that a model trained by the study is scored on
verses it has not seen.

- genesis_next_word.jsonl (multiple choice): the end of a verse prefix and four words, one of which comes
  next in the verse; the other three are words of about the same length drawn from the held-out text.
  The prefix is at most CONTEXT_CHARS characters, cut at a word boundary, so that context and answer fit
  in the 64 positions of the tiny character-level models.
- genesis_heldout.jsonl (perplexity): one document per held-out verse.

Deterministic: a fixed seed, and choices drawn from sorted lists.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEXT = HERE.parent / "study" / "genesis-kjv.txt"
HELD_OUT = 0.1  # the share examples/study/train.py holds out, from the end
N_ITEMS = 150
CONTEXT_CHARS = 40
SEED = 1611


def read_text(path: Path) -> str:
    """The text as examples/study/train.py reads it: every line but the '#' comments."""
    return "".join(ln for ln in path.read_text(encoding="utf-8").splitlines(keepends=True) if not ln.startswith("#"))


def held_out_verses(text: str) -> list[str]:
    cut = int(len(text) * (1 - HELD_OUT))
    lines = text[cut:].splitlines()
    return [ln.strip() for ln in lines[1:] if ln.strip()]  # the first line may start mid-verse


def bare(word: str) -> str:
    return word.strip(".,;:!?'()")


def next_word_items(verses: list[str], rng: random.Random) -> list[dict[str, object]]:
    vocab = sorted({bare(w) for v in verses for w in v.split() if bare(w).isalpha()})
    candidates = []  # (verse, index of the word to guess)
    for v in verses:
        words = v.split()
        candidates += [(v, i) for i in range(3, len(words)) if bare(words[i]).isalpha() and len(bare(words[i])) >= 3]
    items = []
    for v, i in sorted(rng.sample(candidates, N_ITEMS), key=lambda c: (verses.index(c[0]), c[1])):
        words = v.split()
        answer = bare(words[i])
        context = " ".join(words[:i])
        if len(context) > CONTEXT_CHARS:
            context = context[-CONTEXT_CHARS:]
            context = context[context.find(" ") + 1 :] if " " in context else context
        alike = [w for w in vocab if abs(len(w) - len(answer)) <= 1 and w.lower() != answer.lower()]
        choices = rng.sample(alike, 3)
        gold = rng.randrange(4)
        choices.insert(gold, answer)
        items.append({"context": context, "choices": choices, "gold": gold})
    return items


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    verses = held_out_verses(read_text(TEXT))
    assert all(re.fullmatch(r"[ -~]+", v) for v in verses), "held-out verses should be printable ASCII"
    rng = random.Random(SEED)
    write_jsonl(HERE / "genesis_next_word.jsonl", next_word_items(verses, rng))
    write_jsonl(HERE / "genesis_heldout.jsonl", [{"text": v} for v in verses])
    print(f"{N_ITEMS} multiple-choice items and {len(verses)} held-out verses written to {HERE}")


if __name__ == "__main__":
    main()
