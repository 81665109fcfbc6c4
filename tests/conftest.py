"""Shared test fixtures: paths to the project's default model and to the real third-party models."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "digits_cnn.onnx"
SHARED_MODELS = ROOT.parent / "shared" / "models"


def shared_model(name: str) -> Path:
    """Path of a model in ../shared/models, skipping the test when a user's clone lacks that folder."""
    path = SHARED_MODELS / name
    if not path.exists():
        pytest.skip(f"{path} not present (../shared/models is only in the developers' checkout)")
    return path


def shared_model_names() -> list[str]:
    return sorted(path.name for path in SHARED_MODELS.glob("*.onnx")) if SHARED_MODELS.exists() else []
