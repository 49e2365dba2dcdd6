"""The judge of prompt following: an RBF SVM on scikit-learn's digits, refitted exactly from a saved record."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffuserve.models.digits.data import images_to_ink, ink_to_features, load_digits_ink

RECORD_PATH = Path(__file__).resolve().parent / "classifier.json"


@dataclass(frozen=True)
class ClassifierSpec:
    """Everything that determines the classifier. libsvm is deterministic, so refitting from this record
    gives the same model every time (a 50 ms fit, and no pickle that ties the file to one sklearn version)."""

    kind: str = "sklearn.svm.SVC"
    kernel: str = "rbf"
    gamma: float = 0.001
    C: float = 10.0
    test_size: float = 0.25
    split_seed: int = 0


class DigitClassifier:
    """Classifies 32×32 digit images (real or generated) through the same 8×8 features."""

    def __init__(self, spec: ClassifierSpec) -> None:
        from sklearn.model_selection import train_test_split
        from sklearn.svm import SVC

        self.spec = spec
        ink, labels = load_digits_ink()
        # Fitted on the round trip 8×8 → 32×32 → 8×8, the exact path a generated image takes.
        features = ink_to_features(ink)
        x_train, x_test, y_train, y_test = train_test_split(
            features, labels, test_size=spec.test_size, random_state=spec.split_seed, stratify=labels
        )
        self.svc = SVC(kernel=spec.kernel, gamma=spec.gamma, C=spec.C).fit(x_train, y_train)
        self.held_out_accuracy = float(self.svc.score(x_test, y_test))
        self.train_size = len(y_train)
        self.test_size = len(y_test)

    def predict_ink(self, ink: np.ndarray) -> np.ndarray:
        return self.svc.predict(ink_to_features(ink)).astype(np.int64)

    def predict_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.predict_ink(images_to_ink(images))

    def record(self) -> dict[str, Any]:
        return {
            "spec": asdict(self.spec),
            "held_out_accuracy": self.held_out_accuracy,
            "train_size": self.train_size,
            "test_size": self.test_size,
        }


def train_classifier(spec: ClassifierSpec | None = None) -> DigitClassifier:
    return DigitClassifier(spec or ClassifierSpec())


def save_classifier(classifier: DigitClassifier, path: Path = RECORD_PATH) -> None:
    path.write_text(json.dumps(classifier.record(), indent=2) + "\n")


def load_classifier(path: Path = RECORD_PATH) -> DigitClassifier:
    """Refit from the saved record and check that the refit reproduces the recorded held-out accuracy."""
    record = json.loads(path.read_text())
    classifier = DigitClassifier(ClassifierSpec(**record["spec"]))
    if abs(classifier.held_out_accuracy - record["held_out_accuracy"]) > 1e-9:
        raise RuntimeError(
            f"refitted digit classifier scores {classifier.held_out_accuracy:.4f} held out, "
            f"but {path} records {record['held_out_accuracy']:.4f}: the data or scikit-learn changed"
        )
    return classifier
