"""Next-token choice and the verdict score, shared by the ONNX runtime and the transformers baseline.

Both backends feed the same per-step logits through these, so greedy output and scores agree by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy (ties go to the lowest id, as torch.argmax); otherwise softmax(logits / T) with top-p."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class Sampler:
    def __init__(self, sampling: Sampling):
        self.sampling = sampling
        self.rng = np.random.default_rng(sampling.seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.sampling.temperature == 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.sampling.temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        if self.sampling.top_p < 1:
            order = np.argsort(-p, kind="stable")
            keep = np.cumsum(p[order]) - p[order] < self.sampling.top_p  # smallest set reaching top_p
            mask = np.zeros_like(p, dtype=bool)
            mask[order[keep]] = True
            p = np.where(mask, p, 0.0)
            p /= p.sum()
        return int(self.rng.choice(p.size, p=p))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    p = np.exp(z - z.max())
    return p / p.sum()


class VerdictScorer:
    """P("generated") from the next-token distribution at the point where the verdict word starts.

    The verdict word may share a BPE token with the end of its tag (e.g. `>real`), so at each step whose text
    ends inside `<verdict>` the scorer sums the probability of every token that commits to one word and not the
    other, for the rest of the tag plus that word. The last such step before the word begins wins.
    """

    def __init__(self, tokenizer: Tokenizer, open_tag: str, real: str, generated: str, vocab_size: int):
        self.open_tag = open_tag
        self.words = (real, generated)
        self._pieces = [tokenizer.decode([i], skip_special_tokens=False) for i in range(tokenizer.get_vocab_size())]
        self._vocab_size = vocab_size
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _candidates(self, rest: str) -> tuple[np.ndarray, np.ndarray]:
        """Token ids committing to `rest + real` and to `rest + generated` (and not to the other)."""
        if rest not in self._cache:
            targets = [rest + w for w in self.words]

            def fits(piece: str, target: str) -> bool:
                return bool(piece) and (target.startswith(piece) or piece.startswith(target))

            sets = []
            for k, target in enumerate(targets):
                other = targets[1 - k]
                ids = [i for i, p in enumerate(self._pieces) if fits(p, target) and not fits(p, other)]
                sets.append(np.asarray([i for i in ids if i < self._vocab_size], dtype=np.int64))
            self._cache[rest] = (sets[0], sets[1])
        return self._cache[rest]

    def pending_rest(self, text: str) -> str | None:
        """If `text` ends inside the open tag (or right after it), the tag characters still to come."""
        stripped = text.rstrip(" \n")
        tag = self.open_tag
        if stripped.endswith(tag):
            return ""
        if text.endswith(tag[:-1]):  # `>` may fuse with the word into one token
            return tag[-1]
        return None

    def step(self, text_so_far: str, logits: np.ndarray) -> float | None:
        """Score for this step, or None when the verdict word does not start here."""
        rest = self.pending_rest(text_so_far)
        if rest is None:
            return None
        real_ids, gen_ids = self._candidates(rest)
        p = softmax(logits)
        p_real, p_gen = float(p[real_ids].sum()), float(p[gen_ids].sum())
        if p_real + p_gen == 0:
            return None
        return p_gen / (p_real + p_gen)
