"""What the MLflow UI is told about an experiment of this project, as experiment tags, and the
address that opens it on the training runs. Pure: no MLflow (store.py sets the tags).

MLflow 3.17's UI opens an experiment on its GenAI overview (traces, "No data available") unless the
browser has chosen "Model training" before (a setting kept in the browser's local storage) or the
address says `workflowType=machine_learning`; it reads the experiment kind from the tag
`mlflow.experimentKind` in older 3.x releases and in its experiment-type selector. So both are set:
the tag on every experiment, the parameter in the address `tracking ui` prints (`experiment_url`).

The runs table's columns, sort and grouping are browser state too, except for a *saved view*: an
experiment tag `mlflow.sharedViewState.<key>` whose value is {"name", "createdAt", "updatedAt",
"state"} with `state` the JSON of the table's state. It is listed under the runs page's "Views"
and opened by the address parameter `viewStateShareKey=<key>`. `saved_view` builds ours: grouped by
sweep, sorted by test perplexity, with the columns the paper's tables compare; and one view per
sweep with that sweep's runs alone (`sweep_view_tags`), added when the sweep's first run starts.
"""

from __future__ import annotations

import json
import re
import time
from urllib.parse import urlencode

KIND_TAG = "mlflow.experimentKind"
KIND = "custom_model_development"  # the UI's "Machine learning" kind
NOTE_TAG = "mlflow.note.content"  # an experiment's or a run's description (Markdown)
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
VIEW_KEY = "moe-sweeps"
SWEEP_VIEW_KEY_PREFIX = "moe-sweep-"
VIEW_NAME = "Sweeps: perplexity, parameters, ops/timestep"
SWEEP_VIEW_NAME = "Sweep {sweep} alone"
VIEW_VERSION = 2  # bump when the view below changes, so stores made before get the new one
VIEW_VERSION_TAG = "moe.view_version"

# the runs table's columns (MLflow's `<type>.\`<key>\``), after the run name: the paper's tables
# compare test perplexity at parameters and ops/timestep (Tables 7, 8), and Tables 7-8 print
# TFLOPS/GPU
COLUMNS = (
    "metrics.`test_perplexity`",
    "metrics.`params_excl_embedding_softmax`",
    "metrics.`ops_per_timestep`",
    "metrics.`train_tokens`",
    "metrics.`tflops_per_device`",
    "attributes.`Dataset`",
    "attributes.`Duration`",
)
# the table's column ids, left to right, and widths in pixels: the run name, then the metrics, the
# paper's first; MLflow's own columns (created, dataset, duration) after them
RUN_NAME_COLUMN, CREATED_COLUMN, DURATION_COLUMN = (
    "attributes.`Run Name`",
    "runDateAndNestInfo",
    "duration",
)
COLUMN_ORDER = (RUN_NAME_COLUMN, *COLUMNS[:5], CREATED_COLUMN, COLUMNS[5], DURATION_COLUMN)
COLUMN_WIDTHS = {
    RUN_NAME_COLUMN: 250,
    COLUMNS[0]: 130,
    COLUMNS[1]: 230,
    COLUMNS[2]: 150,
    COLUMNS[3]: 110,
    COLUMNS[4]: 150,
    CREATED_COLUMN: 130,
    COLUMNS[5]: 320,
}
SORT_KEY = "metrics.`test_perplexity`"
GROUP_TAG = "sweep"  # the runs' tag that names their sweep (moe_impl/train/monitor.py)


def view_state(sweep: str | None = None) -> dict:
    """The runs page's state of a saved view (keys of MLflow 3.17's runs page): sorted by test
    perplexity, its column first, every run shown in the charts, each run's own line (not a
    group's mean); all runs grouped by sweep, or (`sweep`) that sweep's runs alone, whose charts
    then compare runs of one budget (a shared view cannot hide runs: MLflow drops `runsHidden`)."""
    state = {
        "orderByKey": SORT_KEY,
        "orderByAsc": True,
        "selectedColumns": list(COLUMNS),
        "columnOrder": list(COLUMN_ORDER),
        "columnWidths": dict(COLUMN_WIDTHS),
        "groupBy": {
            "aggregateFunction": "min",
            "groupByKeys": [{"mode": "tag", "groupByData": GROUP_TAG}],
        },
        "groupsExpanded": {},
        "runsHiddenMode": "SHOW_ALL",
        "useGroupedValuesInCharts": False,
        "hideEmptyCharts": True,
    }
    if sweep is not None:
        state["searchFilter"] = f"tags.{GROUP_TAG} = '{sweep}'"
        state["groupBy"] = None
    return state


def saved_view(now_ms: int | None = None, sweep: str | None = None) -> str:
    """The value of a saved-view tag: MLflow's envelope around `view_state`."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    envelope = {
        "name": VIEW_NAME if sweep is None else SWEEP_VIEW_NAME.format(sweep=sweep),
        "createdAt": now_ms,
        "updatedAt": now_ms,
        "state": json.dumps(view_state(sweep)),
    }
    return json.dumps(envelope)


def sweep_view_key(sweep: str) -> str:
    """The saved-view key of one sweep's view: `moe-sweep-lm1b`."""
    return SWEEP_VIEW_KEY_PREFIX + re.sub(r"[^A-Za-z0-9_-]+", "_", sweep)


def sweep_view_tags(sweep: str, existing: dict[str, str], now_ms: int | None = None) -> dict:
    """The tags that give an experiment whose tags are `existing` the saved view of `sweep`,
    where it lacks it or older code saved it ({} otherwise, and for a run outside any sweep)."""
    if not sweep or "'" in sweep:
        return {}
    key = sweep_view_key(sweep)
    version = f"{VIEW_VERSION_TAG}.{key}"
    if existing.get(version) == str(VIEW_VERSION):
        return {}
    return {VIEW_TAG_PREFIX + key: saved_view(now_ms, sweep), version: str(VIEW_VERSION)}


def experiment_note(experiment: str) -> str:
    """The experiment's description, shown above its runs."""
    return (
        f"Runs of `{experiment}`: one per model, balancing-loss setting and seed of each sweep "
        "of the workflow config (run names `<sweep>/<model>[/seed<S>]`). The saved view "
        f'"{VIEW_NAME}" (Views, top right) groups them by sweep and adds the columns the '
        "paper's Tables 7 and 8 compare; a view per sweep shows that sweep alone, so that its "
        "charts compare runs of one budget. Each run's description names the paper's number "
        "for its model."
    )


def experiment_tags(
    experiment: str, existing: dict[str, str], now_ms: int | None = None, runs_view: bool = True
) -> dict:
    """The tags to set on an experiment whose tags are `existing`: the kind, and for an experiment
    of training runs (`runs_view`) the description and the saved view, each only where it is
    missing or (the view) older than VIEW_VERSION; a description or kind the user changed in the
    UI is kept."""
    tags = {}
    if KIND_TAG not in existing:
        tags[KIND_TAG] = KIND
    if not runs_view:
        return tags
    if NOTE_TAG not in existing:
        tags[NOTE_TAG] = experiment_note(experiment)
    if existing.get(VIEW_VERSION_TAG) != str(VIEW_VERSION):
        tags[VIEW_TAG_PREFIX + VIEW_KEY] = saved_view(now_ms)
        tags[VIEW_VERSION_TAG] = str(VIEW_VERSION)
    return tags


def experiment_url(base_url: str, experiment_id: str, view: bool = True) -> str:
    """The address that opens the experiment on its training runs, in our saved view."""
    query = {"workflowType": "machine_learning"}
    if view:
        query["viewStateShareKey"] = VIEW_KEY
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?{urlencode(query)}"
