"""Learning rules: one file each. ``build_rule`` turns a method config into a Rule."""

from __future__ import annotations

from .backprop import BackpropRule
from .base import Feedback, Rule, StepResult
from .dfa import DirectFeedbackAlignmentRule
from .dgl import DGLRule
from .dni import SyntheticGradientRule
from .fa import FeedbackAlignmentRule
from .sign_symmetric import SignSymmetricRule

RULES: dict[str, type[Rule]] = {
    cls.name: cls
    for cls in (
        BackpropRule,
        DGLRule,
        SyntheticGradientRule,
        FeedbackAlignmentRule,
        SignSymmetricRule,
        DirectFeedbackAlignmentRule,
    )
}


def build_rule(cfg) -> Rule:
    """A fresh Rule for one stage from a method config (``cfg.name`` picks the class)."""
    return RULES[cfg.name](cfg)


__all__ = ["RULES", "Feedback", "Rule", "StepResult", "build_rule"]
