"""The DNI paper's recurrent tasks (Jaderberg et al. 2017, section 3.1): copy, repeat copy, character LM.

Every task hands out batches of whole *episodes*: ``x`` (B, S, inputs), ``y`` (B, S, ...) and a
``mask`` (B, S) that is 1 where a step is scored. The trainer cuts each episode into segments of T
steps. The recurrent state starts at zero in every episode and is not carried into the next one,
unlike the paper's continuous stream, because then (1) the episode length is the only dependency
range, so "the longest length learned" measures how far learning reaches across segment
boundaries and nothing else; (2) the gradient beyond the last segment is exactly zero, so no
synthetic gradient is needed there and the bootstrapping chain ends on a true target; (3) full
BPTT over an episode is well defined, which the tests use as the reference.

Losses are summed over scored steps (and output channels), averaged over the batch, in nats: the
sum over segments is then the episode's loss, and its gradient per sequence does not depend on
the batch size. Reported figures are bits: per output step (copy tasks) or per character (text).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import math
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ConfigError
from .config import Curriculum, CopyTask, RepeatCopyTask, TextTask

LN2 = math.log(2.0)


@dataclass
class Episode:
    x: torch.Tensor  # (B, S, inputs) float
    y: torch.Tensor  # (B, S, outputs) float bits (copy tasks) or (B, S) long character ids (text)
    mask: torch.Tensor  # (B, S) float: 1 where the step is scored

    @property
    def scored_steps(self) -> float:
        """Scored steps per sequence (the unit of the reported loss)."""
        return float(self.mask.sum()) / self.x.shape[0]


# --------------------------------------------------------------------- copy tasks


class CopyTaskGenerator:
    """Copy (Graves et al. 2014): L random binary vectors, a delimiter, then L blank steps in which the
    targets are the L vectors. Inputs: ``bits`` channels and the delimiter flag; outputs: ``bits``."""

    def __init__(self, cfg: CopyTask) -> None:
        self.bits = cfg.bits
        self.input_size = cfg.bits + 1
        self.output_size = cfg.bits

    def batch(self, batch_size: int, length: int, generator: torch.Generator) -> Episode:
        b, L, n = batch_size, length, self.bits
        seq = torch.randint(0, 2, (b, L, n), generator=generator).float()
        x = torch.zeros(b, 2 * L + 1, n + 1)
        x[:, :L, :n] = seq
        x[:, L, n] = 1.0  # the delimiter: "now write it back"
        y = torch.zeros(b, 2 * L + 1, n)
        y[:, L + 1:] = seq
        mask = torch.zeros(b, 2 * L + 1)
        mask[:, L + 1:] = 1.0
        return Episode(x, y, mask)

    def loss(self, logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return bits_loss(logits, y, mask)


class RepeatCopyTaskGenerator:
    """Repeat copy: L vectors, then the repeat count N (N / repeats_max on an extra channel, which also
    marks the end of the input); the targets are the L vectors N times, then an end marker on its own
    output channel. N varies per sequence, so a batch is padded to its longest; padding is not scored."""

    def __init__(self, cfg: RepeatCopyTask) -> None:
        self.bits = cfg.bits
        self.repeats = (cfg.repeats_min, cfg.repeats_max)
        self.input_size = cfg.bits + 1
        self.output_size = cfg.bits + 1

    def batch(self, batch_size: int, length: int, generator: torch.Generator) -> Episode:
        b, L, n = batch_size, length, self.bits
        lo, hi = self.repeats
        seq = torch.randint(0, 2, (b, L, n), generator=generator).float()
        reps = torch.randint(lo, hi + 1, (b,), generator=generator)
        steps = L + 1 + int(reps.max()) * L + 1
        x = torch.zeros(b, steps, n + 1)
        x[:, :L, :n] = seq
        x[:, L, n] = reps.float() / hi
        y = torch.zeros(b, steps, n + 1)
        mask = torch.zeros(b, steps)
        for i, r in enumerate(reps.tolist()):
            y[i, L + 1:L + 1 + r * L, :n] = seq[i].repeat(r, 1)
            y[i, L + 1 + r * L, n] = 1.0  # end marker
            mask[i, L + 1:L + 2 + r * L] = 1.0
        return Episode(x, y, mask)

    def loss(self, logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return bits_loss(logits, y, mask)


def bits_loss(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy summed over channels and scored steps, averaged over the batch (nats)."""
    bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none").sum(-1)
    return (bce * mask).sum() / logits.shape[0]


class CurriculumState:
    """The current length L; it grows by one when the mean training loss (bits per output step) of the
    last ``window`` batches at this length is below ``threshold``. ``solved`` is the longest length
    that passed: the figure a comparison reports."""

    def __init__(self, cfg: Curriculum) -> None:
        self.cfg = cfg
        self.length = cfg.start_length
        self.solved = 0
        self.history: list[tuple[int, int]] = [(0, cfg.start_length)]  # (step, length) at every change
        self._recent: list[float] = []

    @property
    def done(self) -> bool:
        return self.solved >= self.cfg.max_length

    def record(self, step: int, loss_bits: float) -> bool:
        """Add one batch's loss; True when that made the length advance (or solved the last one)."""
        self._recent = (self._recent + [loss_bits])[-self.cfg.window:]
        if len(self._recent) < self.cfg.window or sum(self._recent) / len(self._recent) >= self.cfg.threshold:
            return False
        self.solved = max(self.solved, self.length)
        self._recent = []
        if self.length < self.cfg.max_length:
            self.length += 1
            self.history.append((step, self.length))
        return True

    def state_dict(self) -> dict:
        return {"length": self.length, "solved": self.solved, "history": self.history}


# --------------------------------------------------------------------------- text


@functools.lru_cache(maxsize=4)
def stdlib_docstrings(max_chars: int) -> str:
    """The docstrings of this Python's top-level standard-library modules (their source read with ``ast``,
    nothing imported): module, class and function docstrings, files in name order, nodes in ``ast.walk``
    order, joined by blank lines; characters outside printable ASCII become '?'. Deterministic for one
    Python version, different across versions: runs record its version and the corpus's sha256."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a file this Python cannot parse: skipped alike on every run
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc:
                    parts.append(doc)
                    total += len(doc) + 2
        if total >= max_chars:
            break
    text = "\n\n".join(parts)[:max_chars].replace("\t", "    ")
    return "".join(c if c == "\n" or " " <= c <= "~" else "?" for c in text)


class TextTaskGenerator:
    """Next-character prediction. Training episodes are ``sequence_length`` characters from random
    offsets of the training part (one-hot inputs); validation scores consecutive windows of the held-out
    end of the corpus, each from a fresh state, like training."""

    def __init__(self, cfg: TextTask) -> None:
        text = stdlib_docstrings(cfg.max_chars)
        if len(text) < 10 * cfg.sequence_length:
            raise ConfigError(f"task.max_chars: the corpus has only {len(text)} characters, too few for "
                             f"sequence_length {cfg.sequence_length}")
        self.vocab = sorted(set(text))
        index = {c: i for i, c in enumerate(self.vocab)}
        ids = torch.tensor([index[c] for c in text], dtype=torch.long)
        split = int(len(ids) * (1.0 - cfg.validation_fraction))
        self.train_ids, self.val_ids = ids[:split], ids[split:]
        if len(self.val_ids) <= cfg.sequence_length:
            raise ConfigError(f"task.validation_fraction: {len(self.val_ids)} validation characters, fewer than "
                              f"one sequence ({cfg.sequence_length})")
        self.length = cfg.sequence_length
        self.eval_chars = cfg.eval_chars
        self.input_size = self.output_size = len(self.vocab)
        self.info = {
            "corpus": cfg.corpus, "python": sys.version.split()[0], "chars": len(text),
            "sha256": hashlib.sha256(text.encode()).hexdigest(), "vocab": len(self.vocab),
            "train_chars": len(self.train_ids), "validation_chars": len(self.val_ids),
        }

    def _episode(self, windows: torch.Tensor) -> Episode:
        x = F.one_hot(windows[:, :-1], len(self.vocab)).float()
        return Episode(x, windows[:, 1:], torch.ones(windows.shape[0], windows.shape[1] - 1))

    def batch(self, batch_size: int, length: int | None, generator: torch.Generator) -> Episode:
        starts = torch.randint(0, len(self.train_ids) - self.length - 1, (batch_size,), generator=generator)
        return self._episode(torch.stack([self.train_ids[s:s + self.length + 1] for s in starts.tolist()]))

    def validation(self, batch_size: int) -> list[Episode]:
        """Consecutive windows covering the first ``eval_chars`` validation characters."""
        n = min(self.eval_chars, len(self.val_ids) - 1) // self.length
        windows = torch.stack([self.val_ids[i * self.length:(i + 1) * self.length + 1] for i in range(n)])
        return [self._episode(w) for w in windows.split(batch_size)]

    def loss(self, logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(mask)
        return (ce * mask).sum() / logits.shape[0]


def build_task(cfg: CopyTask | RepeatCopyTask | TextTask):
    if isinstance(cfg, CopyTask):
        return CopyTaskGenerator(cfg)
    if isinstance(cfg, RepeatCopyTask):
        return RepeatCopyTaskGenerator(cfg)
    return TextTaskGenerator(cfg)
