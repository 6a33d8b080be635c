"""The kernels must compile with the oldest triton ptkernels supports (3.6, the GPU image's), while CI
installs the newest. ``.ci/run`` ends by compiling them with triton 3.6 (a second install); this
test, in the README's test command, checks in a second on any machine what broke before: every
``tl.<name>`` (and ``tl.math.<name>``) the kernels use must exist in triton 3.6's
``triton.language``, whose public names are recorded in ``tests/triton_language_names.json``
(``dir(triton.language)`` in a venv with triton==3.6.0). ``tl.to_tensor``, which triton 3.6 does
not export, made every sm_90 kernel fail to compile there (the TMA loads' coordinates)."""

from __future__ import annotations

import ast
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECORDED = json.loads((ROOT / "tests" / "triton_language_names.json").read_text())


def tl_names(source: str) -> set[tuple[str, ...]]:
    """Every ``tl.a`` and ``tl.math.b`` attribute chain in ``source``, as ("a",) / ("math", "b")."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "tl":
            found.add((node.attr,))
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "tl"
                and node.value.attr == "math"):
            found.add(("math", node.attr))
    return found


def missing_in_oldest(names: set[tuple[str, ...]]) -> list[str]:
    language, math = set(RECORDED["language"]), set(RECORDED["math"])
    return sorted(".".join(n) for n in names
                  if (len(n) == 1 and n[0] not in language) or (len(n) == 2 and n[1] not in math))


def test_kernels_use_only_tl_names_that_triton_3_6_has():
    used = {}
    for path in sorted((ROOT / "ptkernels").rglob("*.py")):
        for name in missing_in_oldest(tl_names(path.read_text())):
            used.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert RECORDED["triton"] == "3.6.0"
    assert not used, f"tl names that triton {RECORDED['triton']} does not have: {used}"


def test_the_check_sees_names_triton_3_6_lacks():
    """The checker itself: tl.to_tensor (not in 3.6) and tl.math.nonexistent are flagged, tl.cast and
    tl.math.exp2 are not."""
    source = "x = tl.to_tensor(a).to(tl.int32)\ny = tl.cast(a, tl.int32)\nz = tl.math.exp2(y) + tl.math.nonexistent(y)\n"
    assert missing_in_oldest(tl_names(source)) == ["math.nonexistent", "to_tensor"]
