"""Deployments of the two flows with cron schedules, served by one process.

``cellpipe flows serve`` (``python -m flows serve``, see ``flows/__main__.py``) starts a
local Prefect server (schedules need one), points Prefect at it and calls
:func:`serve_deployments`; SIGTERM stops it.
"""

from __future__ import annotations

from pathlib import Path

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from pydantic import Field

from cellpipe.params import StageParams
from flows.scoring import scoring, scoring_on_dask
from flows.training import training


class FlowsParams(StageParams):
    """Schedules and places (``flows:`` in params.yaml)."""

    training_cron: str = Field("0 2 * * *", description="nightly: retrain if anything changed")
    scoring_cron: str = Field("*/15 * * * *", description="every 15 min: score new slides")
    inbox: str = Field("inbox", description="folder or fsspec URL where new slides arrive")
    results: str = Field("results", description="where per-slide results are written")
    protocol: str = Field("grpc", pattern="^(grpc|http)$")
    dask_workers: int = Field(0, ge=0, description="0: threads; N: a local Dask cluster")
    dask_address: str | None = Field(None, description="tcp://host:port of a running Dask "
                                     "scheduler: slides are scored on its workers")


def deployments(params: FlowsParams, repo: Path, params_file: Path, *, url: str | None = None,
                interval_s: float | None = None) -> list[RunnerDeployment]:
    """Both deployments; ``interval_s`` replaces the crons (tests, demos)."""
    schedule = ({"interval": interval_s} if interval_s else None)
    scoring_flow = scoring_flow_for(params)
    return [
        training.to_deployment(
            name="nightly", parameters={"repo": str(repo)},
            **(schedule or {"cron": params.training_cron})),
        scoring_flow.to_deployment(
            name="inbox",
            parameters={"inbox": params.inbox, "out": params.results, "url": url,
                        "protocol": params.protocol,
                        "params_file": str(params_file),
                        "triton_state_dir": str(repo / ".cellpipe" / "triton")},
            **(schedule or {"cron": params.scoring_cron})),
    ]


def scoring_flow_for(params: FlowsParams, dask_address: str | None = None):  # noqa: ANN201
    """The scoring flow on the task runner ``params`` (or ``dask_address``) asks for."""
    address = dask_address or params.dask_address
    if address or params.dask_workers:
        return scoring_on_dask(params.dask_workers or 2, address)
    return scoring


def serve_deployments(params: FlowsParams, repo: Path, params_file: Path, *,
                      url: str | None = None, interval_s: float | None = None,
                      only: str | None = None) -> None:
    """Register the deployments and run them on schedule until stopped."""
    chosen = [d for d in deployments(params, repo, params_file, url=url, interval_s=interval_s)
              if only is None or d.flow_name == only]
    serve(*chosen)
