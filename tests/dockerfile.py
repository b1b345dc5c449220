"""Read deploy/docker/*.Dockerfile, and lay out a build stage's COPYs as docker would.

No base image can be pulled where the tests run, so the images are never built here: the tests
check what each Dockerfile names instead (tests/test_install.py runs its build stage's install
from exactly the files it copies; tests/kube/test_helm.py matches the chart to its entry point
and user). Only the instructions these Dockerfiles use are understood.
"""

from __future__ import annotations

import fnmatch
import json
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parent.parent
DOCKER_DIR = ROOT / "deploy" / "docker"


@dataclass
class Instruction:
    keyword: str
    args: str
    # `COPY --from=build ...` and the like.
    flags: dict[str, str] = field(default_factory=dict)

    def words(self) -> list[str]:
        return shlex.split(self.args)

    def exec_form(self) -> list[str]:
        """ENTRYPOINT / CMD in JSON (exec) form; a shell form is refused: it runs under /bin/sh,
        which then gets the signals meant for the daemon."""
        value = json.loads(self.args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self.args
        return value


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"stage {self.name or self.base}: no {keyword}"
        return found[-1]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            for word in instruction.words():
                key, _, value = word.partition("=")
                values[key] = value
        return values


def parse(path: Path) -> list[Stage]:
    """The stages of a Dockerfile, each with its instructions (continuations joined)."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{path.name}: a line continues past the end"
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        flags: dict[str, str] = {}
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            name, _, value = flag[2:].partition("=")
            flags[name] = value
        instruction = Instruction(keyword, rest.strip(), flags)
        if keyword == "FROM":
            words = instruction.words()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            stages.append(Stage(words[0], name, []))
        elif keyword == "ARG" and not stages:
            continue  # a global ARG (the base image)
        else:
            assert stages, f"{path.name}: {keyword} before FROM"
            stages[-1].instructions.append(instruction)
    return stages


def ignored(relative: str) -> bool:
    """Whether .dockerignore keeps a path of the checkout out of the build context."""
    patterns = [
        p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and p[0] != "#"
    ]
    parts = PurePosixPath(relative).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        bare = pattern.removeprefix("**/")
        for prefix in prefixes:
            if fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(PurePosixPath(prefix).name, bare):
                return True
    return False


def copy_sources(stage: Stage) -> list[str]:
    """What the stage's COPYs take from the build context (not from other stages)."""
    return [word for i in stage.all("COPY") if "from" not in i.flags for word in i.words()[:-1]]


def copied_to(stage: Stage) -> dict[str, str]:
    """Each file or folder the stage's COPYs take from the context -> its path in the image."""
    found: dict[str, str] = {}
    workdir = PurePosixPath("/")
    for instruction in stage.instructions:
        if instruction.keyword == "WORKDIR":
            workdir = workdir / instruction.args
        elif instruction.keyword == "COPY" and "from" not in instruction.flags:
            *sources, dest = instruction.words()
            for source in sources:
                into = dest.endswith("/") or len(sources) > 1
                target = workdir / dest / PurePosixPath(source).name if into else workdir / dest
                found[source] = str(target)
    return found


def installed_path(stage: Stage, command: str) -> str:
    """Where in the image the stage put the program a RUN calls by name."""
    matches = [to for to in copied_to(stage).values() if PurePosixPath(to).name == command]
    assert len(matches) == 1, f"{command}: copied to {matches}"
    return matches[0]


def materialize(stage: Stage, root: Path) -> None:
    """Lay the stage's COPYs out under `root` as they would be in the image (container path /x
    becomes root/x), leaving out what .dockerignore keeps out of the context."""
    workdir = PurePosixPath("/")
    for instruction in stage.instructions:
        if instruction.keyword == "WORKDIR":
            workdir = workdir / instruction.args
            continue
        if instruction.keyword != "COPY" or "from" in instruction.flags:
            continue
        *sources, dest = instruction.words()
        target = root / str(workdir / dest).lstrip("/")
        for source in sources:
            origin = ROOT / source
            if origin.is_dir():
                shutil.copytree(origin, target, dirs_exist_ok=True, ignore=_ignored_names)
            elif dest.endswith("/") or len(sources) > 1:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target / origin.name)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target)


def _ignored_names(directory: str, names: list[str]) -> set[str]:
    base = Path(directory).relative_to(ROOT)
    return {name for name in names if ignored(str(base / name))}
