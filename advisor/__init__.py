"""The SGD phase advisor: short vectorised probes, their spectral phases, the edge of the
convergent region beside the theory (THEORY.md), an Optuna search restricted to it, and
MLflow tracking. Entry points: ``python -m advisor.tune`` and ``python -m advisor.phase_diagram``."""
