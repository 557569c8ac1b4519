"""Write the runtime requirements of a built deepspec wheel to a pip requirements file.

The images install these before the wheel itself, so the dependency layers stay cached while the
source changes. Reading them from the wheel's METADATA keeps pyproject.toml the only place that
lists them. Standard library only: the Makefile runs it with the host's Python before any install.

Usage: python docker/wheel_requirements.py WHEEL_DIR --extras "s3" --output requirements.txt
"""

from __future__ import annotations

import argparse
import re
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

_EXTRA_MARKER = re.compile(r"""^extra\s*==\s*["']([^"']+)["']$""")


def find_wheel(wheel_dir: Path) -> Path:
    """Return the single deepspec wheel in ``wheel_dir``, or raise ``SystemExit`` naming the problem."""
    wheels = sorted(wheel_dir.glob("deepspec-*.whl"))
    if len(wheels) != 1:
        found = ", ".join(wheel.name for wheel in wheels) or "none"
        raise SystemExit(f"expected one deepspec-*.whl in {wheel_dir}, found {found}; run `make wheelhouse`")
    return wheels[0]


def read_metadata(wheel: Path) -> tuple[list[str], set[str]]:
    """Return the ``Requires-Dist`` entries and the ``Provides-Extra`` names of a wheel's METADATA file."""
    with zipfile.ZipFile(wheel) as archive:
        names = [name for name in archive.namelist() if name.endswith(".dist-info/METADATA")]
        if len(names) != 1:
            raise SystemExit(f"{wheel}: expected one .dist-info/METADATA, found {len(names)}")
        metadata = Parser().parsestr(archive.read(names[0]).decode("utf-8"))
    return metadata.get_all("Requires-Dist") or [], set(metadata.get_all("Provides-Extra") or [])


def select_requirements(requires_dist: list[str], extras: set[str]) -> list[str]:
    """Keep the unconditional requirements and those of the chosen extras, without the extra marker.

    Requirements with any other environment marker keep it, so pip still evaluates it in the image.
    """
    selected: list[str] = []
    for entry in requires_dist:
        requirement, _, marker = entry.partition(";")
        requirement, marker = requirement.strip(), marker.strip()
        if "extra" not in marker:
            selected.append(entry.strip())
            continue
        match = _EXTRA_MARKER.match(marker)
        if match is None:
            raise SystemExit(
                f"Requires-Dist {entry!r} combines an extra with another marker, which this script does not"
                " handle; list the requirement without the combined marker in pyproject.toml"
            )
        if match.group(1) in extras:
            selected.append(requirement)
    return selected


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel_dir", type=Path, help="directory that contains the built deepspec wheel")
    parser.add_argument("--extras", default="", help="space- or comma-separated optional dependency groups")
    parser.add_argument("--output", type=Path, required=True, help="requirements file to write")
    args = parser.parse_args(argv)

    wheel = find_wheel(args.wheel_dir)
    extras = {name for name in re.split(r"[\s,]+", args.extras) if name}
    requires_dist, known_extras = read_metadata(wheel)
    unknown = sorted(extras - known_extras)
    if unknown:
        raise SystemExit(
            f"--extras {args.extras!r}: {', '.join(unknown)} not defined by {wheel.name};"
            f" choose from {', '.join(sorted(known_extras))}"
        )
    requirements = select_requirements(requires_dist, extras)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(f"# Runtime requirements of {wheel.name}\n" + "".join(f"{line}\n" for line in requirements))
    print(f"wrote {len(requirements)} requirements of {wheel.name} to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
