"""Typed, validated configuration of a recurrent run (``decoupled sequence``).

The same rules as ``decoupled.config``: YAML (or a dict) checked by pydantic before anything
is built, unknown keys refused, every error naming its field (``task.curriculum.start_length``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from ..config import NAME_PATTERN, _Strict, read_yaml, validate

# --------------------------------------------------------------------------- tasks


class Curriculum(_Strict):
    """Sequence length L grows by one whenever the training loss is low enough (Graves et al. 2014; DNI paper)."""

    start_length: PositiveInt = 1
    max_length: PositiveInt = 64
    threshold: PositiveFloat = Field(
        0.15, description="advance when the mean loss (bits per output step) over the window is below this"
    )
    window: PositiveInt = Field(20, description="training batches averaged at the current length before it may advance")

    @model_validator(mode="after")
    def _start_below_max(self) -> "Curriculum":
        if self.start_length > self.max_length:
            raise ValueError(f"start_length: {self.start_length} is above max_length {self.max_length}")
        return self


class CopyTask(_Strict):
    """L random binary vectors, a delimiter, then L blank steps in which the model writes the vectors back."""

    name: Literal["copy"]
    bits: PositiveInt = Field(8, description="bits per vector")
    curriculum: Curriculum = Field(default_factory=Curriculum)


class RepeatCopyTask(_Strict):
    """L vectors and a repeat count N; the model writes the L vectors N times, then an end marker."""

    name: Literal["repeat_copy"]
    bits: PositiveInt = Field(8, description="bits per vector")
    repeats_min: PositiveInt = Field(1, description="N is drawn uniformly from repeats_min..repeats_max per sequence")
    repeats_max: PositiveInt = 4
    curriculum: Curriculum = Field(default_factory=Curriculum)

    @model_validator(mode="after")
    def _repeats_range(self) -> "RepeatCopyTask":
        if self.repeats_min > self.repeats_max:
            raise ValueError(f"repeats_min: {self.repeats_min} is above repeats_max {self.repeats_max}")
        return self


class TextTask(_Strict):
    """Character-level language modelling on a corpus that ships offline; metric: bits per character."""

    name: Literal["text"]
    corpus: Literal["stdlib_docstrings"] = Field(
        "stdlib_docstrings", description="the docstrings of this Python's standard library (see recurrent/tasks.py)"
    )
    max_chars: PositiveInt = Field(1_000_000, description="corpus size cap (the first this many characters)")
    validation_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="the corpus's last part, held out")
    sequence_length: int = Field(100, ge=2, description="characters per training sequence (state reset in between)")
    eval_chars: PositiveInt = Field(20_000, description="validation characters scored at each evaluation")

    @model_validator(mode="after")
    def _eval_fits(self) -> "TextTask":
        if self.eval_chars < self.sequence_length:
            raise ValueError(f"eval_chars: {self.eval_chars} is less than one sequence ({self.sequence_length})")
        return self


TaskConfig = Annotated[Union[CopyTask, RepeatCopyTask, TextTask], Field(discriminator="name")]

# -------------------------------------------------------------------------- model


class RecurrentModelConfig(_Strict):
    name: Literal["lstm", "gru"] = "lstm"
    hidden: PositiveInt = Field(256, description="units per layer (the DNI paper: 256 for copy and repeat copy)")
    layers: PositiveInt = 1


# ------------------------------------------------------------------------ methods


class TBPTTMethod(_Strict):
    """Truncated BPTT: nothing crosses a segment boundary backwards."""

    name: Literal["tbptt"]


class RecurrentDNIMethod(_Strict):
    """Truncated BPTT plus a synthetic gradient at each segment's last state, standing in for all later segments."""

    name: Literal["dni"]
    predictor: Literal["linear", "mlp"] = Field("linear", description="the DNI paper's RNN predictors are linear")
    predictor_hidden: PositiveInt = Field(256, description="hidden width of an mlp predictor")
    predictor_lr: PositiveFloat = 1e-3
    condition_on_next_input: bool = Field(False, description="the predictor also sees the next segment's first input")
    sg_scale: float = Field(
        1.0, gt=0.0, le=1.0, description="the core uses sg_scale * the synthetic gradient (its weight against "
        "the segment's own loss); the predictor's target is unaffected"
    )
    bootstrap_discount: float = Field(
        1.0, gt=0.0, le=1.0, description="weight of the next synthetic gradient in the predictor's target: 1, the "
        "whole future's gradient (the paper); below 1, later segments count less (as lambda in BP(lambda))"
    )
    aux_future_gradient: bool = Field(
        False, description="the paper's +Aux: a head on the core predicts, at every step, the synthetic gradient "
        "its segment will end with; its loss trains the core too"
    )
    aux_weight: PositiveFloat = 1.0
    predictor_target: Literal["bootstrap", "full_bptt"] = Field(
        "bootstrap", description="bootstrap: the method (the next segment's gradient plus its synthetic one); "
        "full_bptt: a diagnostic upper bound, not a decoupled method - the predictor learns from the true "
        "future gradient that full BPTT of the episode gives, so a result shows what a predictor could do "
        "if its targets were exact"
    )


MethodConfig = Annotated[Union[TBPTTMethod, RecurrentDNIMethod], Field(discriminator="name")]

# what ``sequence-compare`` runs by default: the DNI paper's truncation windows and methods
TRUNCATIONS = (2, 3, 5, 8)
METHODS = ("tbptt", "dni", "dni+aux")  # dni+aux: dni with aux_future_gradient

# ----------------------------------------------------------------------- training


class RecurrentOptimizer(_Strict):
    name: Literal["adam"] = "adam"
    lr: PositiveFloat = 1e-3
    clip_norm: PositiveFloat | None = Field(None, description="clip the core's gradient norm per update; default: off")


class RecurrentTrain(_Strict):
    steps: PositiveInt = Field(2000, description="training batches (episodes); each is cut into segments of T steps, "
                               "with one update per segment")
    batch_size: PositiveInt = 32
    eval_every: PositiveInt = 200
    eval_batches: PositiveInt = 4
    log_every: PositiveInt = 20
    oracle_every: NonNegativeInt = Field(0, description="dni: every this many batches, compare the synthetic "
                                         "gradients with the true ones (full BPTT of that batch); 0: never")
    seed: int = 0
    threads: PositiveInt | None = Field(1, description="torch.set_num_threads; null: torch's choice")
    progress: bool = True


class RecurrentOutput(_Strict):
    dir: Path = Path("runs/recurrent")
    tensorboard: bool = True


class SequenceConfig(_Strict):
    name: str = Field("sequence", pattern=NAME_PATTERN)
    task: TaskConfig
    model: RecurrentModelConfig = Field(default_factory=RecurrentModelConfig)
    method: MethodConfig = Field(default_factory=lambda: TBPTTMethod(name="tbptt"))
    truncation: PositiveInt = Field(3, description="T: steps per segment; gradients cross no segment boundary "
                                    "except as a synthetic gradient")
    optimizer: RecurrentOptimizer = Field(default_factory=RecurrentOptimizer)
    train: RecurrentTrain = Field(default_factory=RecurrentTrain)
    output: RecurrentOutput = Field(default_factory=RecurrentOutput)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> "SequenceConfig":
        return load_sequence_config(path, overrides)

    def override(self, *overrides: str) -> "SequenceConfig":
        """A validated copy with command-line style overrides, e.g. ``cfg.override("truncation=5")``."""
        return build_sequence_config(self.model_dump(mode="json"), list(overrides))


def build_sequence_config(raw: dict, overrides: list[str] | None = None) -> SequenceConfig:
    """Validate a dict (plus ``key=value`` overrides) into a SequenceConfig, or raise ConfigError naming the field."""
    return validate(SequenceConfig, raw, overrides)


def load_sequence_config(path: str | Path, overrides: list[str] | None = None) -> SequenceConfig:
    return build_sequence_config(read_yaml(path), overrides)


def as_sequence_config(config: SequenceConfig | dict) -> SequenceConfig:
    return config if isinstance(config, SequenceConfig) else build_sequence_config(config)
