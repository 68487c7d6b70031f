"""vxnet's version: declared once, as pyproject.toml's [project] version, and read here at run time.

Where, first found wins (<root> is the folder that holds the packages, the parent of wire/):
  <root>/VERSION          one line, written by scripts/build-plugin.sh into the plugin's rootfs (/opt/vxnet/VERSION):
                          pyproject's version, or the one a build was given (`make plugin VERSION=0.2.0`). It is
                          the only file in which two builds of one tree differ (build/plugin-<version>/).
  <root>/pyproject.toml   the source tree: tests, `python3 -m plugin` and `python3 -m cli` from a checkout.
Neither: "0.0.0-unknown" (a copy of the packages without either file), never an error: the version is for
people and records, nothing refuses to run on it.

A version is MAJOR.MINOR.PATCH with an optional -PRERELEASE (semver 2.0.0 without build metadata: `+` is not a
character a Docker tag may hold, and the version is the plugin's tag, `vxnet:0.2.0`).
"""

import functools
import os
import re
from typing import NamedTuple, Optional

VERSION_FILE = "VERSION"
UNKNOWN = "0.0.0-unknown"
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A Docker tag is at most 128 characters of [A-Za-z0-9_.-] (distribution's reference grammar).
_RULE = re.compile(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(?:-([0-9A-Za-z][0-9A-Za-z.-]*))?")
_MAX_LENGTH = 128
RULE = "MAJOR.MINOR.PATCH or MAJOR.MINOR.PATCH-PRERELEASE (digits, e.g. 0.2.0 or 0.2.0-rc1)"


class Version(NamedTuple):
    major: int
    minor: int
    patch: int
    prerelease: str = ""

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}" + (f"-{self.prerelease}" if self.prerelease else "")


def parse(text: str) -> Version:
    """"0.2.0" -> Version(0, 2, 0); ValueError saying what is wrong otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a version: {RULE}")
    found = _RULE.fullmatch(text)
    if found is None or len(text) > _MAX_LENGTH:
        raise ValueError(f"{text!r} is not a version: {RULE}, at most {_MAX_LENGTH} characters")
    return Version(int(found.group(1)), int(found.group(2)), int(found.group(3)), found.group(4) or "")


def declared(pyproject_text: str) -> Optional[str]:
    """The version line of pyproject.toml's [project] table, None if it has none. Only the one table is read
    (the file's other tables may hold version keys of their own); a line parser, because tomllib is Python 3.11
    and the tree supports 3.10."""
    table = None
    for line in pyproject_text.splitlines():
        line = line.strip()
        header = re.fullmatch(r"\[([^\[\]]+)\]", line)
        if header:
            table = header.group(1).strip()
            continue
        if table == "project":
            found = re.fullmatch(r'version\s*=\s*"([^"]*)"', line)
            if found:
                return found.group(1)
    return None


def read(root: str = _ROOT) -> str:
    """The version of the packages under root (see the module's docstring for where it comes from)."""
    try:
        with open(os.path.join(root, VERSION_FILE)) as f:
            return str(parse(f.read().strip()))
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, "pyproject.toml")) as f:
            text = declared(f.read())
        if text is not None:
            return str(parse(text))
    except (OSError, ValueError):
        pass
    return UNKNOWN


@functools.lru_cache(maxsize=None)
def current() -> str:
    """This process's version, read once on first use (never at import time)."""
    return read()


def main(argv=None) -> int:
    """`python3 -m wire.version [VERSION]`: the tree's version, or VERSION checked; what scripts/build-plugin.sh
    asks, so that the shell never parses a version itself. Exit 2 with the reason for a bad one."""
    import sys

    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0]:
        try:
            print(parse(args[0]))
        except ValueError as exc:
            print(f"VERSION: {exc}", file=sys.stderr)
            return 2
        return 0
    with open(os.path.join(_ROOT, "pyproject.toml")) as f:
        text = declared(f.read())
    try:
        print(parse(text or ""))
    except ValueError as exc:
        print(f"pyproject.toml [project] version: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
