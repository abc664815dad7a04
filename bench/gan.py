"""Benchmark: do GAN samples help? DCGAN-BCE against WGAN-GP + DiffAugment.

For each data set, trains both GANs with the real augment stage, reports their
sample quality against val (FID, KID, precision, recall in EfficientNet-Lite0
space) and wall time, then runs the train stage's data gate with each GAN's
synthetic images: val macro-F1 without and with them, and whether they were kept.
Sample grids are copied to bench/results/ for the README.

    python bench/gan.py [--only melanoma melanoma_pseudo melanoma_scratch bccd_wbc sgan
                               sgan_depth]
                        [--epochs N] [--seeds 42 1 2] [--scratch DIR]

melanoma: the shared 200-labeled set at 32 px, 1,500 GAN epochs (classifier at 64 px,
as in train_real.py). melanoma_pseudo: the DCGAN again, its pool grown with the
unlabelled images a linear probe labels confidently (augment.unlabeled), 200 epochs.
melanoma_scratch: that DCGAN once more, the gate's classifier now the small CNN from
scratch on the images' own 32 px (train_real.py --only melanoma_scratch).
bccd_wbc: the demo's BCCD crops, GAN on white cells at 64 px, 100 epochs (a 64 px
step costs ~4x a 32 px one on a CPU).
sgan: the semi-supervised GAN (train.method: sgan) against the supervised run
on the 600 melanoma test images, both through the train and evaluate stages.
sgan_depth: the same on the first 5 of the backbone's 9 blocks (train.backbone_blocks).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import train_real

from cellpipe.data.shards import labeled, open_split, read_meta
from cellpipe.gan.fit import to_gan_tensor
from cellpipe.gan.quality import FeatureSpace, sample_quality, to_uint8
from cellpipe.parallel import default_workers
from cellpipe.params import load_section
from cellpipe.stages import augment as augment_stage
from cellpipe.stages import evaluate as evaluate_stage
from cellpipe.stages import ingest as ingest_stage
from cellpipe.stages import preprocess as preprocess_stage
from cellpipe.stages import train as train_stage

log = logging.getLogger("bench.gan")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

GANS = {
    "DCGAN-BCE": {"loss": "bce", "spectral_norm": False, "diffaugment": [],
                  "betas": [0.5, 0.999]},
    "WGAN-GP + DiffAugment": {"loss": "wgan_gp", "spectral_norm": True,
                              "diffaugment": ["color", "translation", "cutout"],
                              "betas": [0.0, 0.9]},
}


@dataclass
class GanBench:
    resolution: int
    epochs: int
    augment: dict   # classes, count and the GAN's pool (augment.unlabeled)
    train: dict     # the classifier run the gate compares
    gans: tuple[str, ...] = tuple(GANS)
    image_size: int = 64  # melanoma's classifier input (BCCD: params.yaml's)


BENCHES = {
    "melanoma": GanBench(32, 1500, {"count": 200},
                         {**train_real.SUPERVISED_MELANOMA,
                          # 40 val images cannot show a gain of a few points: judge on
                          # 5-fold out-of-fold predictions over all 200 labelled images.
                          "synthetic_folds": 5}),
    "bccd_wbc": GanBench(64, 100, {"classes": ["WBC"], "count": 500}, {}),
}
# The DCGAN again, learning also from the unlabelled images a linear probe labels
# (~3,400 of 7,018 pass the caps, so 200 epochs are ~11,000 generator steps).
BENCHES["melanoma_pseudo"] = GanBench(
    32, 200, {**BENCHES["melanoma"].augment,
              "unlabeled": {"enabled": True, "threshold": 0.9, "max_per_class": 3000,
                            "max_class_ratio": 1.5}},
    BENCHES["melanoma"].train, gans=("DCGAN-BCE",))
# The same DCGAN; the classifier is the small CNN from scratch at 32 px, which learns every
# weight from the 160 train images: the data-starved case where samples could add most.
BENCHES["melanoma_scratch"] = GanBench(
    32, 200, BENCHES["melanoma_pseudo"].augment,
    {**train_real.SMALL_CNN_MELANOMA, "synthetic_folds": 5}, gans=("DCGAN-BCE",), image_size=32)


# The supervised melanoma run of train_real.py; SGAN continues its head phase
# (supervised, cached features) with adversarial fine-tuning of the last 3 blocks.
SUPERVISED_MELANOMA = BENCHES["melanoma"].train
SGAN_MELANOMA = {
    **SUPERVISED_MELANOMA, "method": "sgan",
    "phases": [{"trainable": "head", "epochs": 40, "lr": 0.003},
               {"trainable": 3, "epochs": 10, "lr": 0.0005}],
    "sgan": {"steps_per_epoch": 25, "unlabeled_weight": 1.0},
}


# sgan: the whole backbone; sgan_depth: its first 5 of 9 blocks, all of them fine-tuned
# (the depth bench/feature_depth.py picks; train_real.py --only melanoma_depth).
SGAN_BLOCKS = {"sgan": None, "sgan_depth": 5}


def run_sgan(scratch: Path, seeds: list[int], blocks: int | None = None) -> list[dict]:
    """SGAN and supervised on melanoma: same data, backbone, head phase and evaluate.

    Each seed sets the data order and head initialisation (train.seed) and, for SGAN,
    the generator's initialisation (train.sgan.seed); the last rows are the means.
    ``blocks`` trains both on the first ``blocks`` backbone blocks.
    """
    manifest, shards = _melanoma_shards(scratch)
    runs = [("supervised", SUPERVISED_MELANOMA), ("SGAN", SGAN_MELANOMA)]
    if blocks is not None:
        runs = [(label, train_real.first_blocks(train, blocks, "all")) for label, train in runs]
    rows = []
    for seed in seeds:
        for label, train in runs:
            train = {**train, "seed": seed}
            if "sgan" in train:
                train["sgan"] = {**train["sgan"], "seed": seed}
            rows.append(_sgan_bench_run(label, train, seed, shards, manifest,
                                        scratch / f"{label}-{seed}",
                                        keep_grid=seed == seeds[0] and blocks is None))
            log.info("%s", json.dumps(rows[-1]))
    table = pd.DataFrame(rows)
    for label in ("supervised", "SGAN"):
        runs = table[table["method"] == label]
        rows.append({**runs.iloc[0].to_dict(), "seed": f"mean of {len(runs)}",
                     "wall time": f"{runs['minutes'].mean():.1f} min",
                     "val macro-F1": round(runs["val macro-F1"].mean(), 4),
                     "test accuracy": f"{runs['accuracy'].mean():.1%}",
                     "test macro-F1": round(runs["test macro-F1"].mean(), 3)})
    return [{k: v for k, v in row.items() if k not in ("minutes", "accuracy")} for row in rows]


def _sgan_bench_run(label: str, train: dict, seed: int, shards: Path, manifest: Path,
                    out: Path, keep_grid: bool) -> dict:
    """One run of the comparison; keep_grid copies SGAN's sample grid for the README."""
    started = time.perf_counter()
    trained = train_stage.run(shards, manifest, out, out / "model.pt",
                              train_stage.TrainParams.model_validate(train), device="cpu")
    minutes = (time.perf_counter() - started) / 60
    (out / "evaluate").mkdir(parents=True, exist_ok=True)
    test = evaluate_stage.evaluate(out / "model.pt", shards, out / "evaluate",
                                   out / "calibration.json", evaluate_stage.EvaluateParams())
    if keep_grid and (out / "sgan_generated.png").exists():
        shutil.copy(out / "sgan_generated.png", RESULTS / "sgan_melanoma_generated.png")
    phases = " → ".join(f"{p['trainable']}×{p['epochs']}" for p in train["phases"])
    blocks = f", first {train['backbone_blocks']} blocks" if train.get("backbone_blocks") else ""
    return {"data set": f"melanoma 200 labeled (+7,018 unlabeled for SGAN) → 600 test{blocks}",
            "method": label, "seed": seed, "phases (trainable×epochs)": phases,
            "wall time": f"{minutes:.1f} min", "minutes": minutes,
            "val macro-F1": round(trained["val_macro_f1"], 4),
            "test accuracy": f"{test['accuracy']:.1%}", "accuracy": test["accuracy"],
            "test macro-F1": round(test["macro_f1"], 3),
            "published": "~50% SGAN" if label == "SGAN" else "~75% supervised"}


def _melanoma_shards(scratch: Path, image_size: int = 64) -> tuple[Path, Path]:
    return train_real._prepare(train_real.melanoma([], image_size), scratch)


def _bccd_shards(scratch: Path) -> tuple[Path, Path]:
    """The demo pipeline's ingest and preprocess, with params.yaml's settings."""
    params_file = ROOT / "params.yaml"
    ingest_params = load_section(ingest_stage.IngestParams, "ingest", params_file)
    ingest_stage.run(ROOT / "data" / "bccd", scratch / "ingest", ingest_params,
                     workers=default_workers())
    manifest = scratch / "ingest" / "manifest.parquet"
    preprocess_params = load_section(preprocess_stage.PreprocessParams, "preprocess",
                                     params_file)
    preprocess_stage.run(manifest, ROOT / "data" / "bccd", scratch / "pre", preprocess_params,
                         workers=default_workers())
    return manifest, scratch / "pre" / "shards"


def _train_params(bench: GanBench, synthetic: str) -> train_stage.TrainParams:
    """The gate's run (synthetic: gate), or a plain one with the images always or never."""
    if bench.train:
        train = train_stage.TrainParams.model_validate(bench.train)
    else:
        train = load_section(train_stage.TrainParams, "train", ROOT / "params.yaml")
    folds = train.synthetic_folds if synthetic == "gate" else 0
    return train.model_copy(update={"synthetic": synthetic, "synthetic_folds": folds})


def run_bench(name: str, bench: GanBench, scratch: Path, epochs: int | None) -> list[dict]:
    manifest, shards = (_melanoma_shards(scratch, bench.image_size)
                        if name.startswith("melanoma") else _bccd_shards(scratch))
    rows = [_real_reference(name, bench, shards)]
    for label in bench.gans:
        gan, out = GANS[label], scratch / label.split()[0]
        params = augment_stage.AugmentStageParams.model_validate({
            "enabled": True, **bench.augment,
            "gan": {**gan, "resolution": bench.resolution, "epochs": epochs or bench.epochs,
                    "sample_every": epochs or bench.epochs,
                    "evaluate_every": epochs or bench.epochs}})
        started = time.perf_counter()
        quality = augment_stage.run(shards, out / "augment", out / "gan", params, device="cpu")
        gan_s = time.perf_counter() - started
        gated = train_stage.run(shards, manifest, out / "train", out / "model.pt",
                                _train_params(bench, "gate"),
                                synthetic=out / "augment" / "synthetic", device="cpu")
        # Val is small (40 images on melanoma): test accuracy with and without says more.
        test = {mode: _test_accuracy(bench, mode, shards, manifest, out / mode)
                for mode in ("never", "always")}
        grid = sorted((out / "augment" / "samples").glob("*.png"))[-1]
        shutil.copy(grid, RESULTS / f"gan_{name}_{gan['loss']}.png")
        rows.append({
            "data set": name, "GAN": label, "size": f"{bench.resolution} px",
            "epochs": params.gan.epochs, "GAN wall time": f"{gan_s / 60:.1f} min",
            "GAN train images": quality["gan_train_images"],
            "pseudo-labelled": quality.get("pseudo_labelled_images", 0),
            "probe val accuracy": (f"{quality['probe_val_accuracy']:.1%}"
                                   if "probe_val_accuracy" in quality else ""),
            "FID": round(quality["fid"], 1),
            "KID": f"{quality['kid']:.4f} ± {quality['kid_std']:.4f}",
            "precision": round(quality["precision"], 3), "recall": round(quality["recall"], 3),
            "synthetic": quality["synthetic_images"],
            "val macro-F1 without": round(gated["val_macro_f1_without_synthetic"], 4),
            "val macro-F1 with": round(gated["val_macro_f1_with_synthetic"], 4),
            **_gate_evidence(gated, shards),
            "gain lower bound (90%)": round(gated["val_macro_f1_gain_lower_bound"], 4),
            "gate": "kept" if gated["synthetic_used"] else "rejected",
            "test accuracy without": f"{test['never']:.1%}",
            "test accuracy with": f"{test['always']:.1%}",
        })
        log.info("%s", json.dumps(rows[-1]))
    return rows


def _gate_evidence(gated: dict, shards: Path) -> dict:
    """What the gate judged on: val alone, or out-of-fold predictions over train + val."""
    folds = gated.get("synthetic_folds", 0)
    if not folds:
        return {"gate judged on": f"val ({len(labeled(open_split(shards, 'val')).labels)})",
                "out-of-fold macro-F1 without": "", "out-of-fold macro-F1 with": ""}
    images = sum(len(labeled(open_split(shards, split)).labels) for split in ("train", "val"))
    return {"gate judged on": f"{folds}-fold, train + val ({images})",
            "out-of-fold macro-F1 without": round(gated["cv_macro_f1_without_synthetic"], 4),
            "out-of-fold macro-F1 with": round(gated["cv_macro_f1_with_synthetic"], 4)}


def _test_accuracy(bench: GanBench, synthetic: str, shards: Path, manifest: Path,
                   out: Path) -> float:
    """Train with the synthetic images always or never, and score the test split."""
    train_stage.run(shards, manifest, out, out / "model.pt", _train_params(bench, synthetic),
                    synthetic=out.parent / "augment" / "synthetic", device="cpu")
    (out / "evaluate").mkdir(parents=True, exist_ok=True)
    metrics = evaluate_stage.evaluate(out / "model.pt", shards, out / "evaluate",
                                      out / "calibration.json", evaluate_stage.EvaluateParams())
    return metrics["accuracy"]


def _real_reference(name: str, bench: GanBench, shards: Path) -> dict:
    """The floor: real train images of the same classes against val, in the same space.

    A GAN cannot score better than held-out real images; small val splits put this
    floor far above zero for FID.
    """
    classes = bench.augment.get("classes")
    meta = read_meta(shards)
    picked = [meta["classes"].index(c) for c in classes] if classes else None

    def images(split: str) -> torch.Tensor:
        part = labeled(open_split(shards, split))
        keep = np.isin(part.labels, picked) if picked else np.ones(len(part.labels), bool)
        return to_uint8(to_gan_tensor(np.asarray(part.images)[keep], bench.resolution))

    val, train = images("val"), images("train")
    generator = torch.Generator().manual_seed(0)
    train = train[torch.randperm(len(train), generator=generator)[:len(val)]]
    quality = sample_quality(val, train, FeatureSpace())
    return {"data set": name, "GAN": "(real train images)", "size": f"{bench.resolution} px",
            "epochs": "", "GAN wall time": "", "GAN train images": "", "pseudo-labelled": "",
            "probe val accuracy": "", "FID": round(quality["fid"], 1),
            "KID": f"{quality['kid']:.4f} ± {quality['kid_std']:.4f}",
            "precision": round(quality["precision"], 3), "recall": round(quality["recall"], 3),
            "synthetic": "", "val macro-F1 without": "", "val macro-F1 with": "",
            "gate judged on": "", "out-of-fold macro-F1 without": "",
            "out-of-fold macro-F1 with": "", "gain lower bound (90%)": "", "gate": "",
            "test accuracy without": "", "test accuracy with": ""}


@contextmanager
def _scratch_folder(name: str, keep_in: Path | None) -> Iterator[Path]:
    """``keep_in/name`` when given (kept afterwards), else a temporary folder."""
    if keep_in is not None:
        (keep_in / name).mkdir(parents=True, exist_ok=True)
        yield keep_in / name
        return
    with tempfile.TemporaryDirectory(prefix=f"cellpipe-gan-{name}-") as scratch:
        yield Path(scratch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", default=[*BENCHES, *SGAN_BLOCKS],
                        choices=[*BENCHES, *SGAN_BLOCKS])
    parser.add_argument("--epochs", type=int, help="override the GAN epochs (quick runs)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2],
                        help="seeds of the sgan comparison")
    parser.add_argument("--scratch", type=Path,
                        help="keep the working folders here (default: a temporary folder); a "
                             "rerun resumes each GAN from its checkpoint, so its 'GAN wall "
                             "time' then counts only what was left")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    RESULTS.mkdir(exist_ok=True)
    for name in args.only:
        with _scratch_folder(name, args.scratch) as scratch:
            rows = (run_sgan(scratch, args.seeds, SGAN_BLOCKS[name]) if name in SGAN_BLOCKS
                    else run_bench(name, BENCHES[name], scratch, args.epochs))
        table = pd.DataFrame(rows).to_markdown(index=False)
        (RESULTS / f"gan_{name}.md").write_text(table + "\n")
        print(table, flush=True)


if __name__ == "__main__":
    main()
