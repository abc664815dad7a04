"""The train stage under torchrun: 2 CPU processes (gloo) on the one training loop.

Each run goes through tests/ddp_train.py, which runs the real ``cellpipe train``
command on every rank and reports, from rank 0, every rank's weight hashes and the
output writes each rank made.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ddp_train import digest

from cellpipe.engine.checkpoint import load_model
from cellpipe.stages import export as export_stage
from cellpipe.stages import train as train_stage
from cellpipe.stages.train import TrainParams
from conftest import assert_same_classifier, write_shards

LAUNCHER = Path(__file__).with_name("ddp_train.py")
CLASSES = ("red", "green", "blue")
RANKS = 2
ONE_EPOCH = {"backbone": "smallcnn", "weights": "none", "batch_size": 16,
             "phases": [{"trainable": "all", "epochs": 1, "lr": 0.01}]}


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    # 33 val images: not a multiple of the ranks, so gathering must drop the padding.
    return write_shards(tmp_path / "shards", CLASSES, {"train": 30, "val": 11, "test": 10})


def torchrun_train(shards: Path, manifest: Path, out: Path, params: dict,
                   **env: str) -> tuple[subprocess.CompletedProcess, dict, dict[int, str]]:
    """Run ``cellpipe train`` on RANKS CPU processes; return the process, the launcher's
    report and each rank's stderr."""
    out.mkdir(parents=True, exist_ok=True)
    params_file, report, logs = out / "params.yaml", out / "ddp_report.json", out / "ranks"
    params_file.write_text(yaml.safe_dump({"train": params}))
    report.unlink(missing_ok=True)
    shutil.rmtree(logs, ignore_errors=True)  # torchrun adds a folder per run: keep this one's
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(RANKS), "--log-dir", str(logs), "--redirects", "3",
               str(LAUNCHER), str(report),
               "train", "--shards", str(shards), "--manifest", str(manifest), "--out", str(out),
               "--model", str(out / "model.pt"), "--params", str(params_file), "--device", "cpu"]
    # One thread per process: two ranks share this machine's cores.
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    stderr = {rank: "".join(path.read_text()
                            for path in sorted(logs.glob(f"*/*/{rank}/stderr.log")))
              for rank in range(RANKS)}
    return done, (json.loads(report.read_text()) if report.is_file() else {}), stderr


def assert_same_weights_on_every_rank(report: dict) -> None:
    assert report["weights"], "no fit reported its weights"
    for fit_ranks in report["weights"]:
        assert len(fit_ranks) == RANKS
        assert all(ranked == fit_ranks[0] for ranked in fit_ranks), fit_ranks


@pytest.mark.slow  # ~20-35 s on 2 cores: two processes start torch, then one more trains
def test_two_cpu_processes_train_one_epoch_like_one_process(shards: Path, manifest: Path,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    done, report, stderr = torchrun_train(shards, manifest, out, ONE_EPOCH)
    assert done.returncode == 0, f"{done.stderr}\n{stderr[0]}\n{stderr[1]}"
    assert report["world_size"] == RANKS
    assert [r["exit"] for r in report["ranks"]] == [0] * RANKS
    assert_same_weights_on_every_rank(report)

    # Rank 0 alone writes: the run state, the model, the metrics, the curves.
    writes = {r["rank"]: r["writes"] for r in report["ranks"]}
    assert {"save_run_state", "save_model", "write_json", "training_curves"} <= set(writes[0])
    assert all(not writes[rank] for rank in range(1, RANKS)), \
        f"ranks other than 0 wrote (train.run must write on rank 0 only): {writes}"
    # Rank 0 logs at INFO; the other ranks only warnings and errors.
    assert "phase 1/1 epoch 1:" in stderr[0] and "best val macro-F1" in stderr[0]
    assert all(" INFO " not in stderr[rank] for rank in range(1, RANKS)), stderr[1]

    # The same outputs as one process trains: metric keys, history columns, one epoch.
    single = tmp_path / "single"
    metrics = train_stage.run(shards, manifest, single, single / "model.pt",
                              TrainParams.model_validate(ONE_EPOCH), device="cpu")
    ddp_metrics = json.loads((out / "metrics.json").read_text())
    assert set(ddp_metrics) == set(metrics) and ddp_metrics["epochs"] == 1
    assert (out / "history.csv").read_text().splitlines()[0] == \
        (single / "history.csv").read_text().splitlines()[0]
    trained = load_model(out / "model.pt")
    assert trained.info["history"][0]["epoch"] == 1
    # The weights rank 0 saved are the weights every rank trained.
    assert digest(trained.classifier.state_dict()) == report["weights"][-1][0]["best"]

    exported = export_stage.run(out / "model.pt", tmp_path / "no-calibration.json", shards,
                                tmp_path / "export", export_stage.ExportParams(
                                    fold_temperature=False))
    assert (tmp_path / "export" / "model.onnx").stat().st_size > 0
    assert exported["parity_max_abs_difference"] < 1e-4


@pytest.mark.slow
def test_a_killed_ddp_run_resumes_and_ends_as_an_uninterrupted_one(
        shards: Path, manifest: Path, tmp_path: Path) -> None:
    # A head phase on cached features, then the whole network: killed in its second epoch.
    params = {**ONE_EPOCH, "phases": [{"trainable": "head", "epochs": 1, "lr": 0.01},
                                      {"trainable": "all", "epochs": 2, "lr": 0.01}]}
    uninterrupted, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    done, report, _ = torchrun_train(shards, manifest, uninterrupted, params)
    assert done.returncode == 0, done.stderr
    assert_same_weights_on_every_rank(report)

    done, _, stderr = torchrun_train(shards, manifest, killed, params,
                                     CELLPIPE_TEST_CRASH_AT_EPOCH="3")
    assert done.returncode != 0 and "killed in epoch 3" in stderr[0]
    assert not (killed / "model.pt").exists() and (killed / "checkpoints" / "round0.pt").exists()

    done, report, stderr = torchrun_train(shards, manifest, killed, params)
    assert done.returncode == 0, done.stderr
    assert "resuming after phase 2 epoch 1" in stderr[0]
    assert "phase 1/2" not in stderr[0].split("resuming", 1)[1]  # the head phase is not redone
    assert_same_weights_on_every_rank(report)
    assert_same_classifier(killed, uninterrupted)
    for name in ("history.csv", "metrics.json", "model.pt"):
        assert (killed / name).read_bytes() == (uninterrupted / name).read_bytes(), name
