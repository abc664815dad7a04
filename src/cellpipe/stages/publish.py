"""Publish stage: put the exported model into the Triton repository and onto a server.

Phases: validate (the ONNX file against its card; nothing is written when it
fails) → decide (champion/challenger on validation macro-F1) → write (a new
numbered version, renamed into place; configs from the contract; old versions
pruned) → reload (explicit model control on the running server) → verify (the
server's answer on a fixed input equals onnxruntime in-process) → report.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
from pydantic import Field

from cellpipe.contract import ModelContract
from cellpipe.errors import ParamsError, StageFailed
from cellpipe.fsutil import write_json
from cellpipe.serving.client import TritonClassifier
from cellpipe.serving.onnx_model import open_session, predict_probabilities
from cellpipe.serving.repository import MODEL_FILE, ModelRepository
from cellpipe.serving.server import LocalTriton
from cellpipe.serving.triton_config import ServingParams
from cellpipe.stages.options import add_path

log = logging.getLogger(__name__)

# Agreement demanded between the server and onnxruntime in-process on the same input.
SERVED_TOLERANCE = 1e-5


class PublishParams(ServingParams):
    """The ``publish:`` section of params.yaml."""

    keep_versions: int = Field(3, ge=1)
    # A challenger is published when its val macro-F1 ≥ the champion's + min_gain
    # (a negative value tolerates a small drop, e.g. for a faster model).
    min_gain: float = 0.0


SECTION = "publish"
Params = PublishParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``cellpipe publish``'s options, one per parameter of :func:`run`."""
    add_path(parser, "export", "export folder (model.onnx, card.json)", required=False)
    add_path(parser, "repo", "Triton model repository")
    add_path(parser, "report", "where to write the publish report (JSON)", required=False)
    parser.add_argument("--url", help="Triton HTTP host:port to reload (default: the local "
                                      "server, if one runs)")
    parser.add_argument("--force", action="store_true",
                        help="publish even if the champion scores higher")
    parser.add_argument("--rollback", action="store_true",
                        help="retire the served version and serve the previous one")


def run(export: Path | None, repo: Path, report: Path | None, params: PublishParams, *,
        url: str | None = None, force: bool = False, rollback: bool = False) -> dict:
    """The stage as DVC runs it: publish ``export`` into ``repo`` and write ``report``; or,
    with ``rollback``, serve the previous version again."""
    if rollback:
        version = roll_back(repo, params, url=url)
        log.info("%s: version %d is served again", params.model_name, version)
        return {"action": "rolled back", "version": version}
    if export is None or report is None:
        raise ParamsError("publish needs --export and --report (or --rollback)")
    result = publish(export, repo, params, url=url, force=force)
    write_json(report, result)
    log.info("%s: %s (served version %s): %s", params.model_name, result["action"],
             result["version"], result["reason"])
    return result


def publish(export_dir: Path, repository: Path, params: PublishParams, *,
            url: str | None = None, force: bool = False) -> dict:
    """Publish ``export_dir`` into ``repository``; reload and check the server at ``url``.

    ``url`` (host:port of Triton's HTTP endpoint) defaults to the local server
    started by ``cellpipe triton start`` when one runs; with none, only the
    repository is written (a server started later loads it).
    """
    models = ModelRepository(repository, params)
    decision = models.publish(export_dir, min_gain=params.min_gain,
                              keep_versions=params.keep_versions, force=force)
    log.info("publish: %s (version %s): %s", decision.action, decision.version, decision.reason)
    server = url or _local_server_url()
    served = None
    if server is not None and decision.action == "published":
        served = reload_and_verify(models, server, export_dir / MODEL_FILE)
    return {**asdict(decision), "server": server, "served_check": served}


def roll_back(repository: Path, params: PublishParams, *, url: str | None = None) -> int:
    """Serve the previous version again (and reload the server); return its number."""
    models = ModelRepository(repository, params)
    version = models.rollback()
    server = url or _local_server_url()
    if server is not None:
        reload_and_verify(models, server, repository / models.classifier / str(version) /
                          MODEL_FILE)
    return version


def reload_and_verify(models: ModelRepository, url: str, onnx_path: Path) -> dict:
    """Load the current versions on the server; prove it answers like ``onnx_path`` locally.

    Triton keeps serving the old version until the new one is ready, so clients
    sending requests meanwhile are not refused.
    """
    import tritonclient.http as httpclient

    loader = httpclient.InferenceServerClient(url)
    try:
        for name in models.model_names:
            loader.load_model(name)
    finally:
        loader.close()
    champion = models.champion()
    if champion is None:
        raise StageFailed(f"{models.root}: no published version to load")
    version, card = champion
    contract = ModelContract.from_dict(card["contract"])
    probe = np.random.default_rng(0).normal(size=(8, *contract.input_shape)).astype(np.float32)
    local = predict_probabilities(open_session(onnx_path), contract, probe)
    with TritonClassifier(url, protocol="http", model_name=models.classifier,
                          model_version=str(version)) as client:
        client.check_contract(contract)
        remote = client.classify_tensors(probe)
    difference = float(np.abs(remote - local).max())
    if difference > SERVED_TOLERANCE:
        raise StageFailed(f"{url} serves {models.classifier} v{version}, but its answers differ "
                          f"from onnxruntime in-process by {difference:.2e}")
    log.info("server %s now serves %s v%d (max |Δp| vs in-process %.1e)", url,
             models.classifier, version, difference)
    return {"version": version, "max_abs_difference": difference}


def _local_server_url() -> str | None:
    info = LocalTriton().running()
    return None if info is None else info.http_url
