"""Print pip constraints that pin every dependency of pyproject.toml (with the given extras) to its lower bound.

The minimum-versions CI job installs with these, so each ``>=`` bound in pyproject.toml is a version
the test suite has passed on, not a guess. Usage: python .ci/min_constraints.py test > min.txt
"""

import re
import sys
import tomllib
from pathlib import Path


def lower_bounds(extras):
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in extras:
        specs += project["optional-dependencies"][extra]
    pins = {}
    for spec in specs:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)", spec.strip())
        if not m:
            sys.exit(f"{spec!r}: every dependency needs a plain '>=' lower bound for the minimum-versions job")
        name, version = m.group(1).lower().replace("_", "-"), m.group(2)
        pins[name] = max(pins.get(name, version), version, key=lambda v: tuple(int(x) for x in v.split(".")))
    return pins


if __name__ == "__main__":
    for name, version in sorted(lower_bounds(sys.argv[1:]).items()):
        print(f"{name}=={version}")
