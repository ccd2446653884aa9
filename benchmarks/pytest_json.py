"""pytest, then its counts as one JSON object on the last line (for gpu_all.sh).

    python benchmarks/pytest_json.py REPORT.xml [pytest arguments...]

Runs pytest in this process with a JUnit report at REPORT.xml, prints {"passed", "failed",
"errors", "skipped", "seconds", "failures": [test ids]} and exits with pytest's status.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET

import pytest


def summary(report: str) -> dict[str, object]:
    root = ET.parse(report).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    count = {
        k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")
    }
    failing = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in root.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return {
        "passed": count["tests"] - count["failures"] - count["errors"] - count["skipped"],
        "failed": count["failures"],
        "errors": count["errors"],
        "skipped": count["skipped"],
        "seconds": round(sum(float(s.get("time", 0)) for s in suites), 1),
        "failures": failing,
    }


if __name__ == "__main__":
    report, args = sys.argv[1], sys.argv[2:]
    code = pytest.main([*args, f"--junitxml={report}"])
    print(json.dumps({"pytest_exit": int(code), "args": args, **summary(report)}))
    sys.exit(int(code))
