"""The `scoring` flow: every new slide of an inbox scored on Triton, one task per slide.

Slides map onto tasks (threads by default; a local Dask cluster, or one that already runs,
through :func:`scoring_on_dask`); Triton I/O
sits in tasks that retry. The run's report (report.json, report.html) is written by the
library as in ``cellpipe score``, and the per-slide summaries end up in a markdown artifact.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from cellpipe.errors import CellpipeError
from cellpipe.params import load_section
from cellpipe.serving.client import TritonClassifier
from cellpipe.serving.server import LocalTriton, local_model_card
from cellpipe.serving.triton_config import published_model_name
from cellpipe.slides.batch import (
    InboxSlide,
    ModelKey,
    ScoringStopped,
    SlideOutcome,
    inbox_filesystem,
    list_inbox,
    remove_partial_results,
    score_and_write,
    utc_now,
    write_run_report,
)
from cellpipe.slides.scoring import ScoreParams

RETRY_DELAYS_S = [2, 10, 30]


@task(name="served-model", retries=3, retry_delay_seconds=RETRY_DELAYS_S)
def served_model(url: str, protocol: str, model_name: str, params: ScoreParams) -> ModelKey:
    """The model version the server serves now; every slide of this run uses it.

    Retried by Prefect too: a server that is still loading its models at the start of a
    scheduled run is worth waiting for.
    """
    with TritonClassifier(url, protocol=protocol, model_name=model_name,
                          timeout_s=params.request_timeout_s, retries=params.retries) as client:
        return ModelKey(model_name, client.pin_served_version())


@task(name="list-inbox")
def pending_slides(inbox: str, out: Path, params: ScoreParams) -> list[InboxSlide]:
    remove_partial_results(out)
    return list_inbox(inbox, links_out=params.follow_links_out)[1]


@task(name="score-slide", task_run_name="score {slide.name}")
def score_one(slide: InboxSlide, inbox: str, out: Path, url: str, protocol: str,
              model: ModelKey, params: ScoreParams) -> SlideOutcome:
    """Score one slide (skipped when done, quarantined when anything about it fails).

    A Triton error fails the task after the client's own retries (``score.retries`` ×
    ``score.request_timeout_s``, the one retry budget); the slide stays pending.
    """
    fs = inbox_filesystem(inbox)[0]  # the slide is known: no need to list the inbox again
    with TritonClassifier(url, protocol=protocol, model_name=model.name,
                          model_version=model.version, timeout_s=params.request_timeout_s,
                          retries=params.retries) as client:
        return score_and_write(fs, slide, out, client, params, model)


@task(name="report")
def report(out: Path, inbox: str, model: ModelKey, outcomes: list[SlideOutcome],
           started: str, stopped: str | None = None, model_card: dict | None = None) -> dict:
    """report.json, runs/, summary.csv and report.html (with ``model_card`` when known)."""
    return write_run_report(out, inbox, model, outcomes, started, stopped=stopped,
                            model_card=model_card)


@flow(name="scoring", task_runner=ThreadPoolTaskRunner(max_workers=2))
def scoring(inbox: str, out: str, url: str | None = None, protocol: str = "grpc",
            model_name: str | None = None, params_file: str = "params.yaml",
            triton_state_dir: str = ".cellpipe/triton") -> dict:
    """Score the inbox's new slides into ``out``; publish a table of the summaries."""
    logger = get_run_logger()
    started = utc_now()
    params = load_section(ScoreParams, "score", Path(params_file))
    model_name = model_name or published_model_name(Path(params_file))
    url = url or _local_server_url(Path(triton_state_dir), protocol)
    results = Path(out)
    model = served_model(url, protocol, model_name, params)
    card = local_model_card(model.name, model.version, url=url,
                            state_dir=Path(triton_state_dir))
    slides = pending_slides(inbox, results, params)
    futures = score_one.map(slides, inbox=unmapped(inbox), out=unmapped(results),
                            url=unmapped(url), protocol=unmapped(protocol),
                            model=unmapped(model), params=unmapped(params))
    outcomes, stopped = _gather(futures)
    if stopped is not None:  # the slides done so far are reported, as the CLI does
        report(results, inbox, model, outcomes, started, stopped=str(stopped), model_card=card)
        raise stopped
    run = report(results, inbox, model, outcomes, started, model_card=card)
    logger.info("%s", run["totals"])
    create_markdown_artifact(key="slide-summaries", markdown=_markdown(outcomes),
                             description=f"Slides scored with {model.tag}")
    return run


def scoring_on_dask(workers: int = 2, address: str | None = None):  # noqa: ANN201 (a Flow)
    """The same flow with its per-slide tasks on Dask.

    ``address`` (``tcp://host:8786``) sends them to a scheduler that already runs, with its
    workers wherever they are; without it, a local cluster of ``workers`` processes is
    started for the run. The workers need cellpipe and this repository's ``flows``
    package importable, and must reach the inbox, the results folder and Triton.
    """
    from prefect_dask import DaskTaskRunner

    if address:
        runner = DaskTaskRunner(address=address)
    else:
        runner = DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1,
                                                "dashboard_address": None})
    return scoring.with_options(task_runner=runner)


def _gather(futures: list) -> tuple[list[SlideOutcome], ScoringStopped | None]:
    """Every slide task's outcome, and the first server or disk failure among them."""
    outcomes, stopped = [], None
    for future in futures:
        try:
            outcomes.append(future.result())
        except ScoringStopped as error:
            stopped = stopped or error
    return outcomes, stopped


def _local_server_url(state_dir: Path, protocol: str) -> str:
    info = LocalTriton(state_dir).running()
    if info is None:
        raise CellpipeError("no url given and no local Triton runs (`cellpipe triton start`)")
    return info.url(protocol)


def _markdown(outcomes: list[SlideOutcome]) -> str:
    classes = sorted({name for o in outcomes for name in o.counts})
    lines = ["| slide | status | " + " | ".join(classes) + " | note |",
             "|---|---|" + "---|" * len(classes) + "---|"]
    for o in outcomes:
        counts = " | ".join(str(o.counts.get(name, "")) for name in classes)
        lines.append(f"| {o.slide} | {o.status} | {counts} | {o.reason or o.result or ''} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    scoring(*sys.argv[1:3])
