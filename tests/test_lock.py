"""requirements.lock still covers pyproject.toml: a dependency added without `make lock` fails here, in
`make test`, instead of going missing from `make install` (which installs the lock, then pneumo with --no-deps)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]


def lock_pins(text: str) -> dict[str, tuple[str, int]]:
    """Each pinned package of a pip-compile lock: its version and how many hashes it carries."""
    pins: dict[str, tuple[str, int]] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", block)
        if match:
            pins[canonicalize_name(match[1])] = (match[2], block.count("--hash=sha256:"))
    return pins


def unmet(requirements: list[str], pins: dict[str, tuple[str, int]], extras: list[str]) -> list[str]:
    """The requirements (for the given extras) that the pins leave out or pin outside their range."""
    bad = []
    for line in requirements:
        req = Requirement(line)
        if req.marker and not any(req.marker.evaluate({"extra": extra}) for extra in extras or [""]):
            continue
        pinned = pins.get(canonicalize_name(req.name))
        if pinned is None or not req.specifier.contains(pinned[0], prereleases=True):
            bad.append(f"{line} (lock: {pinned[0] if pinned else 'absent'})")
    return bad


def make_extras() -> list[str]:
    match = re.search(r"^EXTRAS\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, "Makefile: no EXTRAS := line (the extras make install and make lock use)"
    return match[1].split(",")


PINS = lock_pins((ROOT / "requirements.lock").read_text())


def test_lock_pins_every_dependency_and_extra_that_make_install_installs():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = make_extras()
    assert set(extras) <= set(project["optional-dependencies"]), "Makefile EXTRAS names an extra pyproject lacks"
    wanted = project["dependencies"] + [r for extra in extras for r in project["optional-dependencies"][extra]]
    assert unmet(wanted, PINS, extras) == [], "pyproject.toml changed without `make lock`"
    assert "pneumo" not in PINS  # installed on top, editable, with --no-deps


def test_every_pin_has_a_hash_and_the_torch_release_of_requirements_in():
    assert len(PINS) > 100
    assert [name for name, (_, hashes) in PINS.items() if hashes == 0] == []
    for line in (ROOT / "requirements.in").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            assert str(req.specifier) == f"=={PINS[canonicalize_name(req.name)][0]}", line


def test_lock_names_its_platform():
    first = (ROOT / "requirements.lock").read_text().splitlines()[0]
    assert re.match(r"# platform: cpython-3\d+-\w+-\w+ ", first), first


def test_unmet_names_a_missing_package_and_a_pin_outside_its_range():
    pins = lock_pins("foo==1.2 \\\n    --hash=sha256:ab\n    # via x\nbar_baz==0.5 \\\n    --hash=sha256:cd\n")
    assert pins == {"foo": ("1.2", 1), "bar-baz": ("0.5", 1)}
    assert unmet(["foo>=1.0", "Bar.Baz>=0.4"], pins, []) == []
    assert unmet(["foo>=2", "qux>=1"], pins, []) == ["foo>=2 (lock: 1.2)", "qux>=1 (lock: absent)"]
    assert unmet(['qux>=1; extra == "test"'], pins, ["onnx"]) == []
    assert unmet(['qux>=1; extra == "test"'], pins, ["test"]) == ['qux>=1; extra == "test" (lock: absent)']
