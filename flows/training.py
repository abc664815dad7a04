"""The `training` flow: reproduce the DVC pipeline, then publish to the Triton repository.

DVC decides what reruns (changed data, code or params); this flow decides when. DVC runs
as a subprocess, one command per repository at a time (``repo_lock``).
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from cellpipe.orchestration import run_dvc

PUBLISH_STAGE = "publish"


@task(name="dvc-repro")
def reproduce(repo: Path, stage: str | None = None) -> str:
    """``dvc repro [stage]`` (every stage up to and including it; all when None)."""
    return run_dvc(repo, "repro", *([stage] if stage else []))


@task(name="read-publish-report")
def publish_report(repo: Path) -> dict:
    return json.loads((repo / "outputs" / "publish" / "report.json").read_text())


@flow(name="training", log_prints=False)
def training(repo: str = ".", upstream_stage: str = "export") -> dict:
    """Bring every stage up to ``upstream_stage`` up to date, then publish the model."""
    logger = get_run_logger()
    root = Path(repo).resolve()
    reproduce(root, upstream_stage)
    reproduce(root, PUBLISH_STAGE)
    report = publish_report(root)
    logger.info("publish: %s (version %s): %s", report["action"], report["version"],
                report["reason"])
    create_markdown_artifact(
        key="publish-decision",
        markdown=("| action | version | challenger macro-F1 | champion macro-F1 | reason |\n"
                  "|---|---|---|---|---|\n"
                  f"| {report['action']} | {report['version']} | "
                  f"{report['challenger_macro_f1']:.4f} | "
                  f"{(report['champion_macro_f1'] or 0):.4f} | {report['reason']} |"),
        description="What the publish stage decided")
    return report


if __name__ == "__main__":
    training()
