"""pytest plugin used by gpu_check.py: one JSON line per test outcome, written the moment it is known.

    FASTGPT_OUTCOMES=outcomes.jsonl python -m pytest -p pytest_outcomes ...   (benchmarks/ on PYTHONPATH)

A run killed at its time limit therefore still leaves every finished test's outcome (a JUnit XML
report would only be written at the end).  Under pytest-xdist only the controller writes.
"""
from __future__ import annotations

import json
import os

_state = {"write": True}


def pytest_configure(config) -> None:
    _state["write"] = not hasattr(config, "workerinput")  # an xdist worker: the controller writes


def _message(report) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    return str(report.longrepr)[-2000:] if report.longrepr else ""


def pytest_runtest_logreport(report) -> None:
    path = os.environ.get("FASTGPT_OUTCOMES")
    if not path or not _state["write"]:
        return
    # One record per test: its call, or the setup/teardown phase that failed or skipped it.
    if not (report.when == "call" or report.outcome != "passed"):
        return
    record = {"test": report.nodeid, "outcome": report.outcome, "when": report.when,
              "seconds": round(report.duration, 3)}
    if report.outcome != "passed":
        record["message"] = _message(report)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
