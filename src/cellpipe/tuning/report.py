"""What a search leaves: every trial in a table and a plot, and the chosen recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import yaml

from cellpipe.errors import CellpipeError
from cellpipe.fsutil import atomic_path
from cellpipe.tuning.search import best_recipe
from cellpipe.tuning.space import SearchSpace, overrides

TRIALS_CSV = "trials.csv"
TRIALS_PLOT = "trials.png"
BEST_YAML = "best.yaml"


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: its number, state, val macro-F1 (``value``), times, recipe
    choices (``params_*``) and what the trial recorded (``user_attrs_*``: recipe name,
    epochs run, seconds, failure reason)."""
    table = study.trials_dataframe(attrs=("number", "state", "value", "datetime_start",
                                          "duration", "params", "user_attrs"))
    if "duration" in table:
        table["duration"] = table["duration"].dt.total_seconds().round(1)
    return table


def write_trials_csv(table: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


def plot_trials(table: pd.DataFrame, path: Path) -> None:
    """Val macro-F1 of each trial and the best so far; repeated recipes, finalists scored
    on new folds, failed and stopped trials marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on batch machines
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4))
    done = table[table["state"] == "COMPLETE"]
    repeats, rescores = (done[column].notna() if column in done
                         else pd.Series(False, index=done.index)
                         for column in ("user_attrs_repeat_of", "user_attrs_rescore_of"))
    first = ~repeats & ~rescores
    axis.scatter(done.loc[first, "number"], done.loc[first, "value"], label="trial", zorder=3)
    if repeats.any():
        axis.scatter(done.loc[repeats, "number"], done.loc[repeats, "value"], s=10,
                     color="lightgray", label="recipe drawn again", zorder=2)
    if rescores.any():
        axis.scatter(done.loc[rescores, "number"], done.loc[rescores, "value"], marker="^",
                     color="tab:purple", label="finalist on new folds", zorder=3)
    searched = table["state"].eq("COMPLETE")
    if "user_attrs_rescore_of" in table:
        searched &= table["user_attrs_rescore_of"].isna()
    best = table["value"].where(searched).cummax()
    axis.step(table["number"], best, where="post", color="tab:green", label="best so far")
    floor = float(done["value"].min()) if len(done) else 0.0
    for state, marker in (("FAIL", "x"), ("PRUNED", "|")):
        rows = table[table["state"] == state]
        if len(rows):
            axis.scatter(rows["number"], [floor] * len(rows), marker=marker, color="tab:red",
                         label=f"{state.lower()} (at the lowest score)")
    axis.set(xlabel="trial", ylabel="val macro-F1", title="recipe search")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)


def chosen(study: optuna.Study, space: SearchSpace) -> dict[str, Any]:
    """The best trial's recipe: its number, score (over new folds too, for a finalist
    scored again), choices and params.yaml values."""
    chosen_trial = best_recipe(study)
    if chosen_trial is None:
        raise CellpipeError(f"no trial of the search finished ({len(study.trials)} tried): "
                            "nothing to choose; give it a larger --budget")
    best, score = chosen_trial
    return {"trial": best.number, "val_macro_f1": round(score, 6),
            "recipe": best.user_attrs.get("recipe"), "choices": dict(best.params),
            "params": overrides(space, best.params)}


def write_best(choice: dict[str, Any], path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(choice, sort_keys=False))


def write_reports(study: optuna.Study, space: SearchSpace, out: Path) -> dict[str, Any]:
    """trials.csv and trials.png always; best.yaml once a trial finished. Returns the choice."""
    table = trials_table(study)
    write_trials_csv(table, out / TRIALS_CSV)
    plot_trials(table, out / TRIALS_PLOT)
    choice = chosen(study, space)
    write_best(choice, out / BEST_YAML)
    return choice
