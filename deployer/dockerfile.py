"""The images a Dockerfile builds from, read before the build so a push cannot use others'.

A build runs on the deploy host's engine, where every app's images are. `FROM` and
`COPY --from` name images the engine resolves locally, so without a check a push of one
app could start `FROM registry/other-app:sha` and print the other app's files into its
own build output. `images()` lists every image a Dockerfile refers to (stage names are
not images); the deployer then allows its own app's images and the base images the
operator allows, and refuses the rest before the build starts.

Only what the classic builder reads is parsed: the escape directive, line continuations,
comments, `ARG`s before the first `FROM` (their defaults are what a build without
--build-arg uses), `FROM [--platform=P] IMAGE [AS NAME]` and `--from=` on COPY and ADD.
A reference the parser cannot pin down (a variable without a default) is refused rather
than guessed at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from deployer.engine import DeployError

_DIRECTIVE = re.compile(r"#\s*([a-zA-Z]+)\s*=\s*(\S+)\s*$")
_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


@dataclass(frozen=True, slots=True)
class ImageRef:
    image: str
    line: int  # where the instruction starts, 1-based
    instruction: str  # FROM, COPY or ADD


def instructions(text: str) -> list[tuple[int, str, str]]:
    """(line, INSTRUCTION, arguments) of each instruction, continuations joined."""
    lines = text.splitlines()
    escape = "\\"
    for raw in lines:  # parser directives: only at the very top, before anything else
        match = _DIRECTIVE.match(raw)
        if not match:
            break
        if match[1].lower() == "escape" and match[2] in ("\\", "`"):
            escape = match[2]
    out: list[tuple[int, str, str]] = []
    start, parts = 0, list[str]()
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not parts and (not line or line.startswith("#")):
            continue
        if parts and line.startswith("#"):  # a comment inside a continuation
            continue
        if not parts:
            start = number
        if line.endswith(escape):
            parts.append(line[:-1])
            continue
        parts.append(line)
        joined = " ".join(p for p in parts if p)
        word, _, args = joined.partition(" ")
        out.append((start, word.upper(), args.strip()))
        parts = []
    if parts:
        joined = " ".join(p for p in parts if p)
        word, _, args = joined.partition(" ")
        out.append((start, word.upper(), args.strip()))
    return out


def _expand(value: str, args: dict[str, str], line: int) -> str:
    def one(match: re.Match[str]) -> str:
        name = match[1] or match[2]
        if name not in args:
            raise DeployError(
                f"Dockerfile line {line}: ${name} has no default (ARG {name}=...) before the "
                "first FROM; fluster checks the images a build uses, so name them"
            )
        return args[name]

    expanded = _VAR.sub(one, value)
    if "$" in expanded:
        raise DeployError(f"Dockerfile line {line}: cannot read {value!r}; name the image plainly")
    return expanded


def images(text: str) -> list[ImageRef]:
    """Every image the Dockerfile builds from or copies from, in order; stage names
    (FROM ... AS name, or a stage's index) are left out."""
    args: dict[str, str] = {}
    stages: list[str] = []
    found: list[ImageRef] = []
    seen_from = False
    for line, word, rest in instructions(text):
        if word == "ARG" and not seen_from:
            name, sep, default = rest.partition("=")
            if sep:
                args[name.strip()] = default.strip().strip('"').strip("'")
        elif word == "FROM":
            seen_from = True
            words = [w for w in rest.split() if not w.startswith("--platform=")]
            if not words:
                raise DeployError(f"Dockerfile line {line}: FROM names no image")
            image = _expand(words[0], args, line)
            if image.lower() not in stages and image != "scratch":
                found.append(ImageRef(image, line, "FROM"))
            if len(words) >= 3 and words[1].upper() == "AS":
                stages.append(words[2].lower())
            else:
                stages.append(f"#{len(stages)}")
        elif word in ("COPY", "ADD"):
            for option in rest.split():
                if not option.startswith("--"):
                    break
                if option.startswith("--from="):
                    ref = _expand(option.removeprefix("--from="), args, line)
                    if ref.lower() not in stages and not ref.isdigit():
                        found.append(ImageRef(ref, line, word))
    if not seen_from:
        raise DeployError("the Dockerfile has no FROM line")
    return found
