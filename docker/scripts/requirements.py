"""Print cellpipe's requirements for the given extras, one per line, from pyproject.toml.

Images install their dependencies from this list (and requirements.lock as constraints)
in a layer that only pyproject.toml and the lock invalidate; the source comes later,
installed with --no-deps. Self-references such as ``cellpipe[serve]`` are expanded.

    python3 requirements.py pyproject.toml serve pools > requirements.txt
"""

from __future__ import annotations

import re
import sys
import tomllib


def requirements(pyproject: dict, extras: list[str]) -> list[str]:
    project = pyproject["project"]
    name = project["name"]
    optional = project.get("optional-dependencies", {})
    wanted, seen, result = list(extras), set(), list(project["dependencies"])
    while wanted:
        extra = wanted.pop()
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"unknown extra {extra!r}; known: {', '.join(sorted(optional))}")
        seen.add(extra)
        for requirement in optional[extra]:
            own = re.fullmatch(rf"{re.escape(name)}\[([^\]]+)\]", requirement.strip())
            if own:
                wanted.extend(part.strip() for part in own.group(1).split(","))
            else:
                result.append(requirement)
    return list(dict.fromkeys(result))


if __name__ == "__main__":
    with open(sys.argv[1], "rb") as handle:
        print("\n".join(requirements(tomllib.load(handle), sys.argv[2:])))
