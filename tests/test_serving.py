"""Export, publish and serve: ONNX parity, the model repository, a real local Triton.

A small CNN is trained on generated shards once per module; every server test
talks to the real tritonserver bundled in nvidia-pytriton.
"""

from __future__ import annotations

import io
import json
import shutil
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
from google.protobuf import text_format
from PIL import Image
from tritonclient.grpc import model_config_pb2

from cellpipe.cli import main as cli_main
from cellpipe.contract import to_model_input
from cellpipe.data.shards import open_split
from cellpipe.engine.checkpoint import load_model
from cellpipe.errors import CellpipeError, InputError, StageFailed
from cellpipe.serving import triton_config
from cellpipe.serving.client import ContractMismatch, ModelUnavailable, TritonClassifier
from cellpipe.serving.onnx_model import open_session, predict_probabilities, read_contract
from cellpipe.serving.repository import ModelRepository
from cellpipe.serving.server import LocalTriton, ServerInfo, free_port
from cellpipe.stages import export as export_stage
from cellpipe.stages import publish as publish_stage
from cellpipe.stages import train as train_stage
from conftest import write_shards

CLASSES = ("red", "green", "blue")


def _train(root: Path, size: int = 16) -> dict[str, Path]:
    """Shards, a trained small CNN and its calibration file."""
    shards = write_shards(root / "shards", CLASSES, {"train": 30, "val": 12, "test": 12},
                          size=size)
    manifest = root / "manifest.parquet"
    manifest.write_bytes(b"stand-in manifest")
    params = train_stage.TrainParams.model_validate({
        "backbone": "smallcnn", "weights": "none", "batch_size": 16,
        "phases": [{"trainable": "all", "epochs": 3, "lr": 0.01}]})
    train_stage.run(shards, manifest, root / "train", root / "model.pt", params, device="cpu")
    (root / "calibration.json").write_text(json.dumps({"temperature": 0.7}))
    return {"shards": shards, "model": root / "model.pt", "calibration": root / "calibration.json",
            "root": root}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _train(tmp_path_factory.mktemp("trained"))


def _export(trained: dict[str, Path], out: Path, temperature: float = 0.7, **params) -> Path:
    calibration = out.parent / f"{out.name}-calibration.json"
    calibration.parent.mkdir(parents=True, exist_ok=True)
    calibration.write_text(json.dumps({"temperature": temperature}))
    export_stage.run(trained["model"], calibration, trained["shards"], out,
                     export_stage.ExportParams(**params))
    return out


@pytest.fixture(scope="module")
def exported(trained: dict[str, Path]) -> Path:
    return _export(trained, trained["root"] / "export")


@pytest.fixture(scope="module")
def exported_other(trained: dict[str, Path]) -> Path:
    """The same network with another temperature: another file, the same val scores."""
    return _export(trained, trained["root"] / "export-other", temperature=1.3)


def _test_images(trained: dict[str, Path]) -> np.ndarray:
    return np.asarray(open_split(trained["shards"], "test").images)


def _local(export_dir: Path, images: np.ndarray) -> np.ndarray:
    path = export_dir / "model.onnx"
    contract = read_contract(path)
    return predict_probabilities(open_session(path), contract, to_model_input(images, contract))


# --- export ----------------------------------------------------------------------------


def test_export_folds_temperature_and_matches_pytorch(trained: dict[str, Path],
                                                      exported: Path) -> None:
    card = json.loads((exported / "card.json").read_text())
    assert card["temperature"] == 0.7 and card["precision"] == "fp32"
    assert card["parity"]["max_abs_difference"] <= 1e-4
    assert card["parity"]["argmax_mismatches"] == 0 and card["parity"]["images"] == 36
    images = _test_images(trained)
    model = load_model(trained["model"])
    import torch

    with torch.no_grad():
        logits = model.classifier(torch.from_numpy(to_model_input(images, model.contract)))
    expected = torch.softmax(logits / 0.7, dim=1).numpy()
    np.testing.assert_allclose(_local(exported, images), expected, atol=1e-5)
    assert read_contract(exported / "model.onnx") == model.contract


def test_failed_parity_writes_nothing(trained: dict[str, Path], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    real_export = export_stage.export_onnx

    def exporter_with_a_bug(classifier, contract, path, *, temperature, opset):  # noqa: ANN001
        real_export(classifier, contract, path, temperature=temperature * 2, opset=opset)

    monkeypatch.setattr(export_stage, "export_onnx", exporter_with_a_bug)
    with pytest.raises(StageFailed, match="parity failed"):
        _export(trained, tmp_path / "export")
    assert [p.name for p in (tmp_path / "export").iterdir()] == []


def test_int8_is_kept_only_within_the_accuracy_margin(trained: dict[str, Path],
                                                      tmp_path: Path) -> None:
    strict = _export(trained, tmp_path / "strict", quantize_int8=True,
                     int8_max_accuracy_drop=0.0)  # "drop < 0" never holds: always discarded
    card = json.loads((strict / "card.json").read_text())
    assert card["int8"]["kept"] is False and card["precision"] == "fp32"
    lenient = _export(trained, tmp_path / "lenient", quantize_int8=True,
                      int8_max_accuracy_drop=1.0)
    card = json.loads((lenient / "card.json").read_text())
    assert card["int8"]["kept"] is True and card["precision"] == "int8"
    assert card["val"] == card["int8"]["val"]


# --- model repository (no server) ------------------------------------------------------


def test_configs_are_valid_triton_protobuf_from_the_contract(exported: Path) -> None:
    contract = read_contract(exported / "model.onnx")
    params = triton_config.ServingParams(max_batch_size=32, instance_kind="KIND_GPU")
    text = triton_config.to_text(triton_config.classifier_config(contract, params))
    parsed = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert parsed.platform == "onnxruntime_onnx" and parsed.max_batch_size == 32
    assert list(parsed.input[0].dims) == [3, 16, 16] and parsed.input[0].name == "image"
    assert parsed.output[1].label_filename == "labels.txt"
    assert parsed.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    ensemble = triton_config.ensemble_config(contract, params)
    assert [step.model_name for step in ensemble.ensemble_scheduling.step] == [
        "cell_classifier_preprocess", "cell_classifier"]
    assert triton_config.labels_text(contract) == "red\ngreen\nblue\n"


def _repository(tmp_path: Path, **params) -> ModelRepository:
    return ModelRepository(tmp_path / "triton_repo", triton_config.ServingParams(**params))


def _with_card(source: Path, target: Path, **card_changes) -> Path:
    shutil.copytree(source, target)
    card = json.loads((target / "card.json").read_text())
    card.update(card_changes)
    (target / "card.json").write_text(json.dumps(card))
    return target


def test_corrupt_onnx_never_reaches_the_repository(exported: Path, tmp_path: Path) -> None:
    broken = _with_card(exported, tmp_path / "broken")
    data = (broken / "model.onnx").read_bytes()
    (broken / "model.onnx").write_bytes(data[: len(data) // 2])
    repository = _repository(tmp_path)
    with pytest.raises(InputError, match="does not match its card"):
        repository.publish(broken)
    from cellpipe.fsutil import file_sha256

    _with_card(broken, tmp_path / "truncated", onnx_sha256=file_sha256(broken / "model.onnx"))
    with pytest.raises(InputError, match="not a valid ONNX model"):
        repository.publish(tmp_path / "truncated")
    assert not repository.root.exists() or not any(repository.root.rglob("*.onnx"))


def test_republishing_the_same_model_applies_changed_serving_settings(
        exported: Path, tmp_path: Path) -> None:
    """The served model does not change, so there is no new version; the configs do."""
    repository = _repository(tmp_path)
    repository.publish(exported)
    config = repository.root / "cell_classifier" / "config.pbtxt"
    before = config.read_text()
    again = repository.publish(exported)
    assert again.action == "unchanged" and "rewritten" not in again.reason
    assert config.read_text() == before
    changed = _repository(tmp_path, instance_count=3, onnx_threads=2)
    decision = changed.publish(exported)
    assert (decision.action, decision.version) == ("unchanged", 1)
    assert "cell_classifier/config.pbtxt" in decision.reason
    text = config.read_text()
    assert "count: 3" in text and 'string_value: "2"' in text
    assert changed.versions() == [1]


def test_champion_challenger_prune_and_rollback(trained: dict[str, Path], exported: Path,
                                                exported_other: Path, tmp_path: Path) -> None:
    repository = _repository(tmp_path)
    first = repository.publish(exported)
    assert (first.action, first.version) == ("published", 1)
    assert repository.publish(exported).action == "unchanged"
    champion_f1 = first.challenger_macro_f1
    worse = _with_card(exported_other, tmp_path / "worse",
                       val={"images": 36, "accuracy": 0.1, "macro_f1": champion_f1 - 0.2})
    rejected = repository.publish(worse)
    assert (rejected.action, rejected.version) == ("rejected", 1)
    assert repository.publish(worse, force=True).version == 2
    third = _export(trained, tmp_path / "third", temperature=1.0)
    assert repository.publish(third, keep_versions=2).version == 3
    assert repository.versions() == [2, 3]  # version 1 pruned
    model_dir = repository.root / "cell_classifier"
    assert not list(model_dir.glob(".*")), "no staging folder may stay behind"
    assert json.loads((model_dir / "3" / "card.json").read_text())["version"] == 3
    assert (repository.root / "cell_classifier_preprocess" / "3" / "model.py").is_file()

    assert repository.rollback() == 2
    assert repository.versions() == [2]
    assert (model_dir / "retired" / "3" / "model.onnx").is_file()
    with pytest.raises(InputError, match="no earlier version"):
        repository.rollback()
    assert repository.publish(exported).version == 4  # numbers are never reused


def test_rollback_serves_the_configs_of_the_restored_version(exported: Path,
                                                             tmp_path: Path) -> None:
    larger = _train(tmp_path / "larger", size=32)
    exported_32 = _export(larger, tmp_path / "export-32")
    repository = _repository(tmp_path)
    repository.publish(exported)
    repository.publish(exported_32, force=True)
    config = repository.root / "cell_classifier" / "config.pbtxt"
    preprocess = repository.root / "cell_classifier_preprocess" / "config.pbtxt"
    assert "dims: 32" in config.read_text() and "dims: 32" in preprocess.read_text()
    repository.rollback()
    assert "dims: 16" in config.read_text() and "dims: 32" not in config.read_text()
    assert "dims: 32" not in preprocess.read_text()


# --- a real local Triton ---------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, exported: Path
           ) -> Iterator[tuple[ServerInfo, Path]]:
    root = tmp_path_factory.mktemp("served")
    repository = root / "triton_repo"
    ModelRepository(repository, triton_config.ServingParams()).publish(exported)
    local = LocalTriton(root / "state")
    info = local.start(repository, http_port=free_port(), grpc_port=free_port(),
                       metrics_port=free_port())
    try:
        yield info, repository
    finally:
        local.stop()
    assert local.running() is None


def _encode(image: np.ndarray, kind: str) -> bytes:
    buffer = io.BytesIO()
    if kind == "tiff":
        tifffile.imwrite(buffer, image)
    else:
        Image.fromarray(image).save(buffer, format=kind)
    return buffer.getvalue()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_triton_answers_equal_onnxruntime_in_process(
        server: tuple[ServerInfo, Path], trained: dict[str, Path], exported: Path,
        protocol: str) -> None:
    info, _ = server
    images = _test_images(trained)
    expected = _local(exported, images)
    with TritonClassifier(info.url(protocol), protocol=protocol, batch_size=5,
                          concurrency=3) as client:
        client.check_contract(read_contract(exported / "model.onnx"))
        np.testing.assert_allclose(client.classify_images(images), expected, atol=1e-6)
        # Files as they are, preprocessed by the server: PNG, BMP and TIFF, any size.
        for kind in ("png", "bmp", "tiff"):
            encoded = [_encode(image, kind) for image in images]
            np.testing.assert_allclose(client.classify_encoded(encoded), expected, atol=1e-6)
        larger = np.asarray(Image.fromarray(images[0]).resize((48, 48), Image.NEAREST))
        assert client.classify_encoded([_encode(larger, "png")]).shape == (1, 3)


def test_client_errors_say_what_is_wrong(server: tuple[ServerInfo, Path],
                                         exported: Path) -> None:
    info, _ = server
    contract = read_contract(exported / "model.onnx")
    with TritonClassifier(info.grpc_url) as client:
        with pytest.raises(ContractMismatch, match="mean"):
            client.check_contract(replace(contract, mean=(0.4, 0.4, 0.4)))
        with pytest.raises(CellpipeError, match="image 0 of the request"):
            client.classify_encoded([b"not an image"])
    with pytest.raises(ModelUnavailable, match="no ready model 'absent'"):
        _ = TritonClassifier(info.grpc_url, model_name="absent").contract
    with pytest.raises(ModelUnavailable, match="version 7"):
        _ = TritonClassifier(info.http_url, protocol="http", model_version="7").contract
    nowhere = f"127.0.0.1:{free_port()}"
    with pytest.raises(CellpipeError, match="failed after 2 retries"):
        _ = TritonClassifier(nowhere, protocol="http", retries=2, backoff_s=0.01).contract


def test_cli_status_and_classify(server: tuple[ServerInfo, Path], trained: dict[str, Path],
                                 exported: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    info, _ = server
    assert cli_main(["triton", "status", "--url", info.http_url]) == 0
    assert "cell_classifier_images" in capsys.readouterr().out
    images = _test_images(trained)[:3]
    files = []
    for number, image in enumerate(images):
        files.append(tmp_path / f"cell{number}.png")
        files[-1].write_bytes(_encode(image, "png"))
    assert cli_main(["triton", "classify", "--url", info.grpc_url, *map(str, files)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    predicted = [CLASSES[k] for k in _local(exported, images).argmax(1)]
    assert [line.split("\t")[1] for line in lines] == predicted
    assert cli_main(["triton", "status", "--url", f"127.0.0.1:{free_port()}"]) == 1


def test_cli_classify_lists_bad_files_and_scores_the_rest(
        server: tuple[ServerInfo, Path], trained: dict[str, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    info, _ = server
    good = tmp_path / "good.png"
    good.write_bytes(_encode(_test_images(trained)[0], "png"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    missing = tmp_path / "missing.png"
    code = cli_main(["triton", "classify", "--url", info.grpc_url, str(good), str(broken),
                     str(missing)])
    captured = capsys.readouterr()
    assert code == 1
    assert [line.split("\t")[0] for line in captured.out.strip().splitlines()] == [str(good)]
    assert "2 of 3 files could not be classified" in caplog.text
    assert "broken.png: " in caplog.text and "not a recognised image" in caplog.text
    assert "missing.png: cannot read file" in caplog.text


@pytest.mark.slow
def test_publish_under_load_then_rollback(server: tuple[ServerInfo, Path],
                                          trained: dict[str, Path], exported: Path,
                                          exported_other: Path, tmp_path: Path) -> None:
    info, repository = server
    images = _test_images(trained)
    params = publish_stage.PublishParams()
    failures: list[BaseException] = []
    answers: list[np.ndarray] = []
    stop = threading.Event()

    def keep_scoring() -> None:
        with TritonClassifier(info.grpc_url, retries=0, concurrency=2, batch_size=6) as client:
            while not stop.is_set():
                try:
                    answers.append(client.classify_images(images))
                except BaseException as error:  # every failure is what the test looks for
                    failures.append(error)

    worker = threading.Thread(target=keep_scoring)
    worker.start()
    try:
        result = publish_stage.run(exported_other, repository, tmp_path / "report.json", params,
                                   url=info.http_url)
        for _ in range(20):  # keep the load on after the switch as well
            if len(answers) > 5:
                break
            threading.Event().wait(0.2)
    finally:
        stop.set()
        worker.join()
    assert failures == []
    assert result["action"] == "published" and result["served_check"]["version"] == 2
    assert json.loads((tmp_path / "report.json").read_text())["version"] == 2
    with TritonClassifier(info.grpc_url) as client:
        np.testing.assert_allclose(client.classify_images(images),
                                   _local(exported_other, images), atol=1e-6)
    assert publish_stage.roll_back(repository, params, url=info.http_url) == 1
    with TritonClassifier(info.grpc_url) as client:
        np.testing.assert_allclose(client.classify_images(images), _local(exported, images),
                                   atol=1e-6)
