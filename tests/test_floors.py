"""pyproject.toml's floors and .ci/floors.txt, the pins the suite was run on (docs/testing.md, "Dependency floors"), agree."""

from __future__ import annotations

import re

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import ROOT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli there
    import tomli as tomllib

PIN = re.compile(r"^([A-Za-z0-9._-]+)==(\S+)$")


def declared() -> dict[str, Requirement]:
    """Every requirement of the project and its extras, by canonical name (the extras' own `vit[...]` left out)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    reqs = [Requirement(line) for line in lines]
    return {canonicalize_name(r.name): r for r in reqs if canonicalize_name(r.name) != canonicalize_name(project["name"])}


def pinned() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / ".ci" / "floors.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            match = PIN.match(line)
            assert match, f".ci/floors.txt: {line!r} is not name==version"
            pins[canonicalize_name(match[1])] = Version(match[2])
    return pins


def floor(req: Requirement) -> Version | None:
    lows = [Version(s.version) for s in req.specifier if s.operator in (">=", "~=", "==")]
    return max(lows) if lows else None


def test_every_requirement_has_a_floor():
    assert [name for name, req in declared().items() if floor(req) is None] == []


def test_the_floors_file_pins_exactly_the_declared_packages():
    assert sorted(pinned()) == sorted(declared())


def test_each_pin_is_its_floor():
    """1.3 and 1.3.0 are one floor; a post-release (1.3.0.post0) may pin the release it follows, where only that is published."""
    reqs, pins = declared(), pinned()
    for name, req in reqs.items():
        pin = pins[name]
        assert pin in req.specifier, f"{name}=={pin} is outside {req}"
        assert Version(pin.base_version) == floor(req), f"{name}: pyproject.toml's floor is {floor(req)}, .ci/floors.txt pins {pin}"
