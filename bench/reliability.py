"""Benchmark: the bad-input corpus through every entry point, and randomised SIGKILL trials.

Generates the corpus of tests/reliability/corpus.py (bad and unusual inputs a lab drops:
truncated, mislabelled, tiny, huge, odd bit depths and layouts, odd names, links, FIFOs…),
runs it through ingest, slide scoring, the served decoder and, unless ``--no-triton``, a
real local Triton's preprocess model via ``cellpipe triton classify``; then kills scoring
batches at seeded random times and compares each rerun with a clean run. Writes
bench/results/reliability.md and .json: inputs per entry point, accepted and refused,
tracebacks (must be 0), kills, and anything lost, duplicated or different (must be 0).

    python bench/reliability.py [--trials 10] [--no-triton]

Needs no data set; under 2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "reliability")]
os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bar per scoring run

import corpus  # noqa: E402 (the tests' folders first)
import test_kills  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10, help="SIGKILL trials (default 10)")
    parser.add_argument("--no-triton", action="store_true",
                        help="skip the run through a local Triton (no model trained)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # quarantine warnings would bury the output
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cellpipe-reliability-") as folder:
        root = Path(folder)
        entries = {entry: run_corpus(entry, root / entry) for entry in ("ingest", "score",
                                                                          "served")}
        if not args.no_triton:
            entries["triton"] = run_triton_cli(root / "triton")
        trials, clean, batch_s = test_kills.run_trials(root / "kills", args.trials)
        result = summarise(entries, trials, clean, batch_s, time.monotonic() - started, folder)
    write(result)


def run_corpus(entry: str, root: Path) -> dict:
    """The corpus through ``entry``: the kinds that break it as a whole (known defects) on
    their own, the rest in one run, as tests/reliability/test_corpus.py does."""
    shared = [kind for kind in corpus.KINDS if (kind.name, entry) not in corpus.KNOWN_DEFECTS]
    run = corpus.run_entry(entry, root / "shared", shared)
    inputs, outcomes, problems = list(run.inputs), dict(run.outcomes), run.problems()
    defects = []
    for (kind_name, defect_entry), defect in corpus.KNOWN_DEFECTS.items():
        kind = next(kind for kind in corpus.KINDS if kind.name == kind_name)
        if defect_entry != entry or kind.skip() is not None:
            continue
        alone = corpus.run_entry(entry, root / kind_name, [kind])
        mine = [item for item in alone.inputs if item.kind == kind_name]
        inputs += mine
        outcomes |= {item.path: alone.outcomes[item.path] for item in mine}
        found = alone.problems()
        problems |= {path: found[path] for path in found if path in {i.path for i in mine}}
        lost = [item.path for item in alone.inputs
                if item.kind == "good_neighbour" and item.path in found]
        defects.append({"kind": kind_name, "entry": entry, "defect": defect,
                        "hung": alone.hung, "good_neighbours_lost": len(lost),
                        "problems": sorted(set(found.values()))})
    return {"run": run, "inputs": inputs, "outcomes": outcomes, "problems": problems,
            "defects": defects, "seconds": run.seconds}


def run_triton_cli(root: Path) -> dict:
    """`cellpipe triton classify` on every content kind, against a local Triton serving a
    small CNN trained here (the preprocess model does not depend on the model)."""
    from cellpipe.serving import triton_config
    from cellpipe.serving.repository import ModelRepository
    from cellpipe.serving.server import LocalTriton, free_port
    from test_serving import _export, _train

    trained = _train(root / "trained")
    repository = root / "triton_repo"
    ModelRepository(repository, triton_config.ServingParams()).publish(
        _export(trained, root / "export"))
    content = [kind for kind in corpus.KINDS if kind.layer == "content"]
    folder = root / "files"
    inputs = corpus.generate(folder, root / "outside", kinds=content)
    inputs += corpus.neighbours(folder, 3)
    server = LocalTriton(root / "state")
    info = server.start(repository, http_port=free_port(), grpc_port=free_port(),
                        metrics_port=free_port())
    try:
        cli = corpus.run_triton(folder, inputs, info.grpc_url)
    finally:
        server.stop()
    served = corpus.run_served(folder, inputs)
    problems = {}
    for item in inputs:
        problem = corpus.check(item, "triton", cli.outcomes[item.path])
        if problem is None and cli.outcomes[item.path].status != served[item.path].status:
            problem = "Triton and the in-process decoder disagree"
        if problem:
            problems[item.path] = problem
    if "Traceback" in cli.stderr:
        problems["(stderr)"] = "a traceback in stderr"
    return {"inputs": inputs, "outcomes": cli.outcomes, "problems": problems, "defects": [],
            "seconds": cli.seconds, "exit_code": cli.returncode}


def _disagreements(entries: dict) -> list[str]:
    """Single images that one entry point refuses and another accepts."""
    found = []
    compared = [entry for entry in ("ingest", "score", "served", "triton") if entry in entries]
    for item in entries["served"]["inputs"]:
        if item.layer != "content":
            continue
        statuses = {entry: entries[entry]["outcomes"][item.path].status for entry in compared
                    if item.path in entries[entry]["outcomes"]}
        if len(set(statuses.values())) > 1:
            found.append(f"{item.kind}: {statuses}")
    return found


def summarise(entries: dict, trials: list, clean: dict, batch_s: float, wall: float,
              tmp: str) -> dict:
    per_entry = {}
    for entry, found in entries.items():
        statuses = [outcome.status for outcome in found["outcomes"].values()]
        per_entry[entry] = {
            "inputs": len(found["inputs"]),
            "accepted": statuses.count("accepted"),
            "refused": statuses.count("refused"),
            "tracebacks": statuses.count("traceback"),
            "vanished": statuses.count("missing"),
            "not_as_expected": len(found["problems"]),
            "seconds": round(found["seconds"], 2),
            **({"exit_code": found["exit_code"]} if "exit_code" in found else {}),
        }
    kinds = {}
    for kind in corpus.KINDS:
        row = {"layer": kind.layer}
        for entry, found in entries.items():
            items = [item for item in found["inputs"] if item.kind == kind.name]
            if items:
                row[entry] = [_cell(found["outcomes"][item.path],
                                    found["problems"].get(item.path), tmp) for item in items]
        kinds[kind.name] = row
    return {
        "date": dt.date.today().isoformat(),
        "machine": f"{_cpu_name()}, {len(os.sched_getaffinity(0))} cores, "
                   f"Python {platform.python_version()}",
        "wall_s": round(wall, 1),
        "kinds": len(corpus.KINDS),
        "kinds_skipped": corpus.skipped(),
        "entry_points": per_entry,
        "known_defects": json.loads(json.dumps(
            [defect for found in entries.values() for defect in found["defects"]],
            ensure_ascii=False).replace(tmp, "$TMP")),
        "hangs": sum(defect["hung"] for found in entries.values()
                     for defect in found["defects"]),
        "disagreements": _disagreements(entries),
        "per_kind": kinds,
        "kills": {
            "trials": len(trials),
            "kills": sum(len(trial.kills) for trial in trials),
            "kills_mid_batch": sum(trial.killed for trial in trials),
            "slides": len(clean),
            "clean_batch_s": round(batch_s, 2),
            "lost": sum(len(trial.lost) for trial in trials),
            "duplicated": sum(len(trial.duplicated) for trial in trials),
            "different": sum(len(trial.different) for trial in trials),
            "leftover_partial_results": sum(len(trial.leftovers) for trial in trials),
            "stray_temporary_files": sum(len(trial.stray_files) for trial in trials),
            "trial_s": [trial.seconds for trial in trials],
            "kill_times_s": [trial.kills for trial in trials],
        },
    }


def _cell(outcome: corpus.Outcome, problem: str | None, tmp: str) -> str:
    """One input's outcome in a few words (Triton's error keeps only the decoder's reason)."""
    if outcome.status == "accepted":
        text = "accepted"
    elif outcome.status == "refused":
        reason = outcome.reason.replace(tmp, "$TMP").split("of the request: ")[-1]
        text = f"refused: {reason.splitlines()[0][:80]}"
    else:
        text = outcome.status.upper()
    if problem:
        text += f" [NOT AS EXPECTED: {problem.replace(tmp, '$TMP')[:100]}]"
    return text


def write(result: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "reliability.json").write_text(json.dumps(result, indent=2, ensure_ascii=False)
                                              + "\n")
    entries = result["entry_points"]
    kills = result["kills"]
    tracebacks = sum(e["tracebacks"] for e in entries.values())
    lost = kills["lost"] + kills["duplicated"] + kills["different"]
    lines = [
        f"# Reliability: bad inputs and killed batches ({result['date']})",
        "",
        f"Machine: {result['machine']}; wall {result['wall_s']} s. Produced by "
        "`python bench/reliability.py` from the corpus in `tests/reliability/corpus.py` "
        "(checked by `tests/reliability/test_corpus.py` and `test_kills.py`).",
        "",
        f"**{result['kinds']} kinds of input** ({len(result['kinds_skipped'])} skipped here: "
        + (", ".join(f"{k}: {v}" for k, v in result["kinds_skipped"].items()) or "none")
        + f"). **Tracebacks: {tracebacks}**, hangs: {result['hangs']} (must be 0). **Lost, "
        f"duplicated or different after a kill: {lost}** (must be 0).",
        "",
        "## Inputs per entry point",
        "",
        "| entry point | inputs | accepted | refused with a reason | tracebacks | vanished "
        "| not as expected | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = {"ingest": "ingest (class folders → manifest / rejected.csv)",
             "score": "slide scoring (`score_inbox`)",
             "served": "served files (`encoded_to_model_input`)",
             "triton": "Triton preprocess model (`cellpipe triton classify`)"}
    for entry, row in entries.items():
        exit_code = f" (exit {row['exit_code']})" if "exit_code" in row else ""
        lines.append(f"| {names[entry]}{exit_code} | {row['inputs']} | {row['accepted']} | "
                     f"{row['refused']} | {row['tracebacks']} | {row['vanished']} | "
                     f"{row['not_as_expected']} | {row['seconds']} |")
    lines += ["", "Inputs count files, links and FIFOs, and 3 good neighbours per run; ingest "
              "and scoring also see the name kinds (names, links, hidden files, a FIFO), "
              "the served entry points only the content kinds.", ""]
    if result["known_defects"]:
        lines += ["## Known defects (each run on its own, with good neighbours)", "",
                  "| kind | entry point | what happens | hung | good neighbours lost |",
                  "|---|---|---|---|---|"]
        for defect in result["known_defects"]:
            hung = "yes, until the bench opened the FIFO's other end" if defect["hung"] else "no"
            lines.append(f"| {defect['kind']} | {defect['entry']} | {defect['defect']} | "
                         f"{hung} | {defect['good_neighbours_lost']} |")
        lines.append("")
    lines += ["## Entry points agree", "",
              f"Single images refused by one entry point and accepted by another: "
              f"{len(result['disagreements'])}."
              + ("".join(f"\n- {d}" for d in result["disagreements"])), "",
              "## Killed scoring batches", "",
              f"{kills['trials']} trials on an inbox of {kills['slides']} files (good slides, "
              f"a truncated JPEG, a hidden file, a text file), a clean batch taking "
              f"{kills['clean_batch_s']} s: SIGKILL at seeded random times (odd seeds kill "
              f"the rerun too), then a rerun to the end, compared slide by slide (counts, "
              f"objects, quarantine reasons) with a clean run.", "",
              "| trials | kills | of them mid-batch | lost | duplicated | different | partial "
              "results left | stray temporary files |", "|---|---|---|---|---|---|---|---|",
              f"| {kills['trials']} | {kills['kills']} | {kills['kills_mid_batch']} | "
              f"{kills['lost']} | {kills['duplicated']} | {kills['different']} | "
              f"{kills['leftover_partial_results']} | {kills['stray_temporary_files']} |", "",
              "Stray temporary files are the hidden `.<name>.<random>.tmp` of a quarantine "
              "record or report being written at the kill, left after the rerun (which "
              "sweeps them): must be 0.", "",
              "## Every kind", "",
              "| kind | " + " | ".join(entries) + " |",
              "|---|" + "---|" * len(entries)]
    for name, row in result["per_kind"].items():
        cells = [" · ".join(row[entry]) if entry in row else "—" for entry in entries]
        lines.append(f"| {name} | " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    (RESULTS / "reliability.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:40]))


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
