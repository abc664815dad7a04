"""The Triton model repository: versioned, atomic publishing with champion/challenger.

Layout under the repository root (``triton_repo/``), for a model name ``NAME``::

    NAME/config.pbtxt, labels.txt, <version>/model.onnx + card.json, retired/<version>/
    NAME_preprocess/config.pbtxt, <version>/model.py       (same version numbers)
    NAME_images/config.pbtxt, labels.txt, 1/               (the ensemble)

A version is assembled in a hidden temporary folder and renamed into place, so a
server never sees half a model; Triton ignores folders that are not numbers.
The served version is the highest number (``version_policy: latest 1``), and the
configs are always generated from that version's model card, so a rollback to a
version with another input size serves the right config.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

from cellpipe.contract import ModelContract
from cellpipe.errors import InputError
from cellpipe.fsutil import atomic_dir, atomic_path, file_sha256, write_json
from cellpipe.serving import triton_config
from cellpipe.serving.onnx_model import validate_onnx
from cellpipe.serving.triton_config import ServingParams

log = logging.getLogger(__name__)

MODEL_FILE, CARD_FILE, RETIRED = "model.onnx", "card.json", "retired"


@dataclass(frozen=True)
class Decision:
    """What publish did and why."""

    action: str  # published | unchanged | rejected
    version: int | None  # the version served afterwards
    challenger_macro_f1: float
    champion_macro_f1: float | None
    reason: str


class ModelRepository:
    """Publish, inspect and roll back the models of one Triton repository folder."""

    def __init__(self, root: Path, params: ServingParams) -> None:
        self.root = root
        self.params = params
        self.classifier, self.preprocess, self.ensemble = triton_config.names(params)

    @property
    def model_names(self) -> tuple[str, str, str]:
        """Load order: the ensemble's steps before the ensemble."""
        return self.preprocess, self.classifier, self.ensemble

    def versions(self) -> list[int]:
        """Published (servable) classifier versions, oldest first."""
        return _numbered(self.root / self.classifier)

    def card(self, version: int) -> dict:
        return json.loads((self.root / self.classifier / str(version) / CARD_FILE).read_text())

    def champion(self) -> tuple[int, dict] | None:
        """The served version and its model card, if any version is published."""
        versions = self.versions()
        return (versions[-1], self.card(versions[-1])) if versions else None

    def publish(self, export_dir: Path, *, min_gain: float = 0.0, keep_versions: int = 3,
                force: bool = False) -> Decision:
        """Publish the exported model as a new version if it is at least as good as the champion.

        The ONNX file is validated first (complete, runnable, honouring its card's
        contract); nothing is written to the repository when it is not.
        """
        model_path, card = export_dir / MODEL_FILE, _read_card(export_dir / CARD_FILE)
        if file_sha256(model_path) != card["onnx_sha256"]:
            raise InputError(f"{model_path} does not match its card (interrupted export?); "
                             "rerun the export stage")
        contract = ModelContract.from_dict(card["contract"])
        validate_onnx(model_path, contract)
        challenger = float(card["val"]["macro_f1"])
        champion = self.champion()
        if champion is not None:
            version, champion_card = champion
            incumbent = float(champion_card["val"]["macro_f1"])
            if champion_card["onnx_sha256"] == card["onnx_sha256"]:
                # Same model: only the serving settings (publish.* in params.yaml) may have
                # changed, and they must reach the configs without a new version.
                rewritten = self._write_configs(contract)
                return Decision("unchanged", version, challenger, incumbent,
                                f"this model is already version {version}" + (
                                    f"; serving config rewritten ({', '.join(rewritten)})"
                                    if rewritten else ""))
            if challenger < incumbent + min_gain and not force:
                return Decision("rejected", version, challenger, incumbent,
                                f"val macro-F1 {challenger:.4f} < champion v{version} "
                                f"{incumbent:.4f} + min_gain {min_gain}")
        version = self._next_version()
        self._write_version(version, model_path, card, contract)
        self._write_configs(contract)
        self._prune(keep_versions)
        incumbent = None if champion is None else float(champion[1]["val"]["macro_f1"])
        return Decision("published", version, challenger, incumbent,
                        "first version" if champion is None else
                        f"val macro-F1 {challenger:.4f} ≥ champion {incumbent:.4f} + {min_gain}"
                        if not force else "forced")

    def rollback(self) -> int:
        """Retire the served version; the previous one is served again. Returns its number."""
        versions = self.versions()
        if len(versions) < 2:
            raise InputError(f"{self.root / self.classifier}: no earlier version to roll back "
                             f"to (published: {versions or 'none'})")
        latest = versions[-1]
        for model in (self.classifier, self.preprocess):
            retired = self.root / model / RETIRED
            retired.mkdir(exist_ok=True)
            (self.root / model / str(latest)).rename(retired / str(latest))
        previous = versions[-2]
        self._write_configs(ModelContract.from_dict(self.card(previous)["contract"]))
        log.info("rolled back %s: version %d retired, version %d served",
                 self.classifier, latest, previous)
        return previous

    def _next_version(self) -> int:
        """Never reuse a number, not even a retired one: caches and logs key on it."""
        used = [*self.versions(), *_numbered(self.root / self.classifier / RETIRED)]
        return max(used, default=0) + 1

    def _write_version(self, version: int, model_path: Path, card: dict,
                       contract: ModelContract) -> None:
        published_card = {**card, "version": version, "published_at":
                          datetime.now(UTC).isoformat(timespec="seconds"),
                          "git_revision": _git_revision()}
        preprocess_code = resources.files("cellpipe.serving.triton_python") / "preprocess_model.py"
        with atomic_dir(self.root / self.preprocess / str(version)) as folder:
            (folder / "model.py").write_text(preprocess_code.read_text())
        with atomic_dir(self.root / self.classifier / str(version)) as folder:
            shutil.copyfile(model_path, folder / MODEL_FILE)
            write_json(folder / CARD_FILE, published_card)

    def _write_configs(self, contract: ModelContract) -> list[str]:
        """config.pbtxt and labels.txt of all three models, from ``contract``; returns the
        files whose content changed (relative to the repository)."""
        configs = {self.classifier: triton_config.classifier_config(contract, self.params),
                   self.preprocess: triton_config.preprocess_config(contract, self.params),
                   self.ensemble: triton_config.ensemble_config(contract, self.params)}
        (self.root / self.ensemble / "1").mkdir(parents=True, exist_ok=True)
        files = {self.root / model / triton_config.LABELS_FILE: triton_config.labels_text(contract)
                 for model in (self.classifier, self.ensemble)}
        files.update({self.root / model / "config.pbtxt": triton_config.to_text(config)
                      for model, config in configs.items()})
        return [str(path.relative_to(self.root)) for path, text in files.items()
                if _write_text(path, text)]

    def _prune(self, keep_versions: int) -> None:
        for version in self.versions()[:-keep_versions]:
            for model in (self.classifier, self.preprocess):
                shutil.rmtree(self.root / model / str(version), ignore_errors=True)
            log.info("pruned %s version %d (keeping the last %d)", self.classifier, version,
                     keep_versions)


def _numbered(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir()
                  if p.is_dir() and p.name.isdigit() and not p.name.startswith("0"))


def _read_card(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"no model card at {path} (run the export stage first)")
    return json.loads(path.read_text())


def _write_text(path: Path, text: str) -> bool:
    """Write ``text`` atomically unless the file holds it already; whether it was written
    (a server polling the repository reloads a model whose config file changed)."""
    if path.is_file() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return True


def _git_revision() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip()
