"""Text-aware retrieval of memory frames: the frames whose shots' text matches the shot about to be drawn.

StoryMem's bank is purely visual: the next shot sees the sink and the most recent keyframes, whoever they show.
In a story with several characters that puts one character's frames in front of another's shot, the limit the
paper names (OneStory selects frames for the current prompt instead). Here each remembered keyframe carries the
text of the *take* it came from, and the shot about to be drawn keeps the frames whose take reads most like its
own:

* A take is a shot together with the shots before it that it continues (``cut: false``), so "the same character
  jumps" inherits who "the same character" is (:func:`take_texts`: the take's prompts, one per line).
* Relevance is a TF-IDF cosine (:class:`TextRelevance`): inverse document frequencies over the story's takes,
  English function words left out, so the words that set takes apart (names, colours, clothes, places) count
  and the ones every prompt has do not. The shot about to be drawn is compared, as its whole take, with each
  prompt of a remembered frame's take, and the best of those counts: a take of several shots is as relevant
  as its most relevant prompt, not diluted by the others. No model is needed, and two renders of a story
  retrieve the same frames.
* Selection (:func:`select_relevant`): reference images always stay; keyframes are ranked by their take's
  relevance (the more recent first among equals) and fill the ``max_memory`` budget, then go back into story
  order. ``min_relevance`` drops takes whose cosine is below it, ``relative_relevance`` those below that share
  of the best take's. With both at 0 (the default) nothing is dropped for being unlike the prompt: the ranking
  decides only which frames a full bank keeps.

Picking the thresholds: they depend on how prompts are written. In the small world's short prompts, a cut shot's
earlier takes of the same character score 0.46 (median) and those of the other character 0.06 (0.22 at the 90th
percentile), and ``min_relevance=0.3, relative_relevance=0.5`` keep the right character's frames: over the cut
shots of 100 stories made with another seed than the held-out ones, 0.96 of the frames kept show the shot's
character, 0.98 of the shots of a character seen before keep at least one of its frames (0.90 of that
character's earlier shots), and 0.95 of those that introduce a character keep none. ST-Bench's prompts describe
setting and action at length: there a cut shot's best earlier take scores 0.04-0.18 (5th-95th percentile, 146
shots), also when the same person returns, so a floor of 0.3 would empty the memory of every cut shot; leave the
thresholds at 0, or low, for such prompts.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, Sequence

import numpy as np

RETRIEVAL_MODES = ("window", "prompt")

# English function words (articles, pronouns, prepositions, conjunctions, auxiliaries, directions) and the
# camera vocabulary every shot prompt uses: they say nothing about who or what a take shows.
STOP_WORDS = frozenset("""
a an the this that these those some any each every all both either neither another other such same
i me my we us our you your he him his she her it its they them their who whom whose which what
is am are was were be been being has have had having do does did doing will would shall should can could may
might must and or but nor so yet if then than as because while when where whereas though although until
of in on at to from by for with without within into onto upon out off over under above below across along
around through throughout toward towards near beside besides between among about against after before behind
beyond during inside outside past since up down left right forward forwards backward backwards back away
there here not no only also just very too again still even ever more most much many few less least
shot shots camera frame scene close closeup medium wide view
""".split())

_WORD = re.compile(r"[^\W_]+", re.UNICODE)


class RetrievalError(ValueError):
    """Bad retrieval settings or inputs."""


def text_terms(text: str) -> list[str]:
    """The words of ``text`` that can tell takes apart: lower-cased letter/digit runs, function words dropped."""
    return [w for w in _WORD.findall(str(text).lower()) if w not in STOP_WORDS]


def take_texts(prompts: Sequence[str], cuts: Sequence[bool]) -> list[str]:
    """Per shot, the text of its take: its prompt after those of the shots it continues (``cut`` False), back
    to the shot that opened the take, one prompt per line."""
    if len(prompts) != len(cuts):
        raise RetrievalError(f"{len(prompts)} prompts but {len(cuts)} cut flags")
    texts: list[str] = []
    for i, (prompt, cut) in enumerate(zip(prompts, cuts)):
        line = " ".join(str(prompt).split())  # a prompt's own line breaks would split it into two
        texts.append(line if cut or i == 0 else f"{texts[-1]}\n{line}")
    return texts


def story_take_texts(story: Any) -> list[str]:
    """:func:`take_texts` of a :class:`~storymem.story.Story`."""
    return take_texts([s.prompt for s in story], [s.cut for s in story])


class TextRelevance:
    """TF-IDF cosine between texts, with inverse document frequencies over ``corpus`` (a story's take texts).

    ``idf(w) = ln((1 + N) / (1 + df(w))) + 1``: a word in every take still counts a little, one in a single take
    counts most; words the corpus never saw get the weight of a word seen once. Called as
    ``relevance(query, texts)``: a float array, one score in [0, 1] per text (0 for an empty or None text):
    the cosine between the query, taken whole, and the text's best line (a take's best prompt).
    """

    def __init__(self, corpus: Sequence[str]):
        documents = [set(text_terms(t)) for t in corpus]
        self.num_documents = len(documents)
        self.document_frequency = Counter(w for d in documents for w in d)

    def idf(self, word: str) -> float:
        df = self.document_frequency.get(word, 1)
        return math.log((1 + self.num_documents) / (1 + df)) + 1.0

    def vector(self, text: str | None) -> dict[str, float]:
        counts = Counter(text_terms(text)) if text else Counter()
        weights = {w: n * self.idf(w) for w, n in counts.items()}
        norm = math.sqrt(sum(v * v for v in weights.values()))
        return {w: v / norm for w, v in weights.items()} if norm > 0 else {}

    def __call__(self, query: str, texts: Sequence[str | None]) -> np.ndarray:
        q = self.vector(query)
        cache: dict[str | None, float] = {}
        out = np.zeros(len(texts), dtype=np.float64)
        for i, text in enumerate(texts):
            if text not in cache:
                lines = [self.vector(line) for line in (text or "").splitlines()]
                cache[text] = max((sum(w * v.get(word, 0.0) for word, w in q.items()) for v in lines), default=0.0)
            out[i] = cache[text]
        return np.clip(out, 0.0, 1.0)


def select_relevant(
    scores: Sequence[float | None],
    max_memory: int,
    min_relevance: float = 0.0,
    relative_relevance: float = 0.0,
) -> list[int]:
    """Indices (in story order) of the memory entries to keep, given one score per entry in story order.

    A score of None marks a reference image: kept always, first in the budget. The others compete on their
    score (ties: the later entry first) for what the references leave of ``max_memory``, after those below
    ``min_relevance`` or below ``relative_relevance`` x the best score are dropped."""
    if max_memory < 1:
        raise RetrievalError(f"max_memory must be >= 1, got {max_memory}")
    pinned = [i for i, s in enumerate(scores) if s is None]
    scored = [(float(s), i) for i, s in enumerate(scores) if s is not None]
    if any(not math.isfinite(s) for s, _ in scored):
        raise RetrievalError("relevance scores must be finite")
    best = max((s for s, _ in scored), default=0.0)
    floor = max(min_relevance, relative_relevance * best)
    eligible = [(s, i) for s, i in scored if s >= floor]
    eligible.sort(key=lambda item: (-item[0], -item[1]))
    room = max(0, max_memory - len(pinned))
    kept = pinned[:max_memory] + [i for _, i in eligible[:room]]
    return sorted(kept)

