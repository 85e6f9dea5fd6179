"""Each test file's seconds in one full run, the slowest first: ``tests/file_seconds.json``, which ``conftest.py``
orders the files by so that xdist hands the long ones out first (longest first keeps the last worker's tail short).
Only an order: a stale or missing entry costs time, never a test. Regenerate after a run that wrote JUnit XML:

    .venv/bin/python -m pytest -q -n 2 --dist loadfile --junitxml=/tmp/run.xml
    .venv/bin/python tests/file_seconds.py /tmp/run.xml
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

TABLE = Path(__file__).with_name("file_seconds.json")
KEEP = 60  # the files that decide the tail; the rest keep their collection order after them


def main(junit_xml: str) -> None:
    seconds: Counter[str] = Counter()
    for case in ET.parse(junit_xml).iter("testcase"):
        module = case.get("classname", "").split(".")  # tests.test_x or tests.test_x.TestClass
        if len(module) > 1 and module[1].startswith("test_"):
            seconds[f"{module[1]}.py"] += float(case.get("time", 0.0))
    TABLE.write_text(json.dumps({f: round(s, 1) for f, s in seconds.most_common(KEEP)}, indent=0) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
