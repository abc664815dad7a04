"""Assign train/val/test splits: stratified by label, grouped by source slide.

Rules, in order:

1. A split given by the source (TRAIN/TEST folders, ``test/``, ImageSets) is kept.
2. Files with identical bytes (same sha256) are put in one group, so that the
   splitter keeps copies together; copies that the *source* put in different
   splits are resolved by :func:`drop_cross_split_duplicates`.
3. Rows without a given split, and rows the source calls ``train`` (a TRAIN folder
   is where val is usually carved from), form a pool; ``test`` is drawn from it
   only if the source gave no test rows, ``val`` only if it gave no val rows. Drawing uses
   scikit-learn's StratifiedGroupKFold, so crops of one slide never straddle splits.
4. A class with at least one group per split it is drawn into has a group in each
   (train, val and test for a class of 3 single images): a stratified draw cannot
   promise that for a class with fewer groups than folds, so whole groups are moved
   in or out of the draw where it missed one (:func:`_keep_every_class`).
5. Unlabeled rows without a split go to ``unlabeled``.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

from cellpipe.data.sources import Rejection

log = logging.getLogger(__name__)

# When copies of one file sit in several given splits, the copy in the most
# held-out split is kept, so evaluation sets stay as published and train never
# sees an evaluation image.
_HOLDOUT_PRIORITY = {"test": 0, "val": 1, "train": 2, "unlabeled": 3}


def merge_duplicate_groups(rows: pd.DataFrame) -> pd.Series:
    """Group id per row, where source groups that share any file content are merged.

    Nodes of a bipartite graph are source groups and file contents (sha256); each
    row joins its group to its content. Connected components are the merged
    groups, each named after its first source id so ids stay readable.
    """
    group_codes, groups = pd.factorize(rows["source_id"])
    content_codes, contents = pd.factorize(rows["sha256"])
    n_nodes = len(groups) + len(contents)
    graph = coo_matrix((np.ones(len(rows)), (group_codes, len(groups) + content_codes)),
                       shape=(n_nodes, n_nodes))
    _, component = connected_components(graph, directed=False)
    source_ids = pd.Series(rows["source_id"].to_numpy())
    merged = source_ids.groupby(component[group_codes]).transform("first")
    return pd.Series(merged.to_numpy(), index=rows.index)


def assign_splits(rows: pd.DataFrame, *, val_fraction: float, test_fraction: float,
                  seed: int) -> pd.Series:
    """Return the split of every row (columns used: label, split, group)."""
    split = rows["split"].copy()
    given = set(split.dropna())
    unlabeled = split.isna() & rows["label"].isna()
    split[unlabeled] = "unlabeled"
    pool = split.isna() | (split == "train")
    split[pool] = None
    draw_val = "val" not in given and val_fraction > 0
    if "test" not in given and test_fraction > 0:
        # What the draw leaves must still reach val (if drawn) and train.
        take = _draw(rows[pool], test_fraction, seed, later=2 if draw_val else 1)
        split[take] = "test"
        pool &= split.isna()
    if draw_val:
        # Express the val fraction relative to what is left of the pool.
        remaining_share = 1.0 - (test_fraction if "test" not in given else 0.0)
        take = _draw(rows[pool], min(1.0, val_fraction / remaining_share), seed + 1, later=1)
        split[take] = "val"
        pool &= split.isna()
    split[pool] = "train"
    return split


def _draw(pool: pd.DataFrame, fraction: float, seed: int, *, later: int) -> pd.Index:
    """Index of about ``fraction`` of ``pool``'s rows, whole groups at a time, stratified by
    label; ``later`` is how many splits are drawn from what is left (see _keep_every_class)."""
    if pool.empty or fraction <= 0:
        return pool.index[:0]
    groups, labels = pool["group"].to_numpy(), pool["label"].astype(str).to_numpy()
    n_groups = len(set(groups))
    n_splits = max(2, round(1 / fraction))
    if n_groups < 2:
        return pool.index[:0]
    # StratifiedGroupKFold needs a class with a member in every fold; a class with fewer
    # members than folds lands in some folds only (sklearn warns), which
    # _keep_every_class mends.
    if n_groups >= n_splits and pd.Series(labels).value_counts().max() >= n_splits:
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The least populated class", UserWarning)
            _, held_out = next(splitter.split(np.zeros(len(pool)), labels, groups))
    else:
        # Too few groups to stratify: keep the grouping, drop stratification.
        log.warning("only %d groups for a %.0f%% draw: split is grouped but not stratified",
                    n_groups, 100 * fraction)
        splitter = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
        _, held_out = next(splitter.split(np.zeros(len(pool)), labels, groups))
    drawn = np.zeros(len(pool), bool)
    drawn[held_out] = True
    return pool.index[_keep_every_class(pool, drawn, later, seed)]


def _keep_every_class(pool: pd.DataFrame, drawn: np.ndarray, later: int,
                      seed: int) -> np.ndarray:
    """``drawn`` with whole groups moved so that each class reaches every split it can.

    A class with more than ``later`` groups in the pool gets one in the draw and keeps
    ``later`` for the splits drawn after it (val, then train); a class with fewer keeps
    them all, so that train has it first. Where the stratified draw already did this (any
    class with a group per fold), nothing moves. The smallest groups move first, so the
    draw's size changes least (ties in an order fixed by ``seed``). A group of several
    classes moves for the rarest one; ingest reports any class still missing a split.
    """
    group_of = pool["group"].to_numpy()
    in_draw = set(group_of[drawn])
    sizes = pool.groupby("group").size()
    tiebreak = pd.Series(np.random.default_rng(seed).permutation(len(sizes)), index=sizes.index)
    class_groups = pool[pool["label"].notna()].groupby("label")["group"].unique()

    def movable(groups: np.ndarray, drawn_now: bool) -> list:
        return sorted((g for g in groups if (g in in_draw) == drawn_now),
                      key=lambda g: (sizes[g], tiebreak[g]))

    for label in sorted(class_groups.index, key=lambda name: len(class_groups[name])):
        groups = class_groups[label]
        drawn_count = sum(g in in_draw for g in groups)
        if len(groups) > later and drawn_count == 0:
            in_draw.add(movable(groups, False)[0])
            drawn_count = 1
        too_few_left = min(later, len(groups)) - (len(groups) - drawn_count)
        if too_few_left > 0:
            in_draw.difference_update(movable(groups, True)[:too_few_left])
    return np.isin(group_of, list(in_draw))


def drop_cross_split_duplicates(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame,
                                                              list[Rejection]]:
    """Keep each file content in one split only and report every duplicate.

    Returns the kept rows, a report of all duplicate sets (one line per file),
    and rejections for copies dropped because their split or label conflicts.
    """
    files = rows.drop_duplicates("path")[["path", "sha256", "label", "split"]]
    copies = files[files.duplicated("sha256", keep=False)].copy()
    if copies.empty:
        empty = pd.DataFrame(columns=["sha256", "path", "split", "label", "kept"])
        return rows, empty, []
    copies["rank"] = copies["split"].map(_HOLDOUT_PRIORITY)
    copies = copies.sort_values(["sha256", "rank", "path"])
    rejections: list[Rejection] = []
    dropped: set[str] = set()
    for _, same in copies.groupby("sha256", sort=False):
        labels = set(same["label"].dropna())
        if len(labels) > 1:
            for path in same["path"]:
                rejections.append(Rejection(path, "identical image appears with conflicting "
                                                  f"labels {sorted(labels)}"))
                dropped.add(path)
            continue
        keeper = same.iloc[0]
        for _, copy in same.iloc[1:].iterrows():
            if copy["split"] != keeper["split"]:
                rejections.append(Rejection(copy["path"], f"exact duplicate of {keeper['path']} "
                                                          f"(kept in split '{keeper['split']}')"))
                dropped.add(copy["path"])
    copies["kept"] = ~copies["path"].isin(dropped)
    report = copies[["sha256", "path", "split", "label", "kept"]].reset_index(drop=True)
    return rows[~rows["path"].isin(dropped)], report, rejections
