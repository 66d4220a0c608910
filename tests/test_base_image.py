"""scripts/base-image.sh reads the Debian mirror from the machine's apt sources at run time
(it is never written into the repository). These check that reading on the formats a
Debian host may have: deb822 `.sources`, one-line `.list` with options, another release,
third-party repositories mixed in. No network, no Docker: `--print-sources` only.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "base-image.sh"


def sources(apt_etc: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), "--print-sources"],
        env={**os.environ, "APT_ETC": str(apt_etc)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture
def apt_etc(tmp_path: Path) -> Path:
    (tmp_path / "sources.list.d").mkdir()
    return tmp_path


def test_deb822_sources_with_a_third_party_repository(apt_etc: Path) -> None:
    (apt_etc / "sources.list.d" / "vendor.sources").write_text(
        "Types: deb\nURIs: https://vendor.invalid/apt\nSuites: nodistro\nComponents: main\n"
    )
    (apt_etc / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\n"
        "# a comment\n"
        "URIs: http://mirror.invalid/debian\n"
        "Suites: bookworm bookworm-updates\n"
        "Components: main contrib\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        "\n"
        "Types: deb\n"
        "URIs: http://mirror.invalid/debian-security\n"
        "Suites: bookworm-security\n"
        "Components: main\n"
    )
    result = sources(apt_etc)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "deb http://mirror.invalid/debian bookworm main",
        "deb http://mirror.invalid/debian bookworm-updates main",
        "deb http://mirror.invalid/debian-security bookworm-security main",
    ]


def test_one_line_sources_of_another_release(apt_etc: Path) -> None:
    (apt_etc / "sources.list").write_text(
        "# deb http://old.invalid/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://mirror.invalid/debian trixie main\n"
        "deb-src http://src.invalid/debian trixie main\n"
        "deb http://mirror.invalid/debian trixie-backports main\n"
    )
    result = sources(apt_etc)
    assert result.returncode == 0, result.stderr
    # The mirror of this host's release serves bookworm too; no security source named.
    assert result.stdout.splitlines() == [
        "deb http://mirror.invalid/debian bookworm main",
        "deb http://mirror.invalid/debian bookworm-updates main",
    ]


def test_disabled_stanzas_and_non_debian_sources_are_not_used(apt_etc: Path) -> None:
    (apt_etc / "sources.list.d" / "debian.sources").write_text(
        "Enabled: no\nTypes: deb\nURIs: http://off.invalid/debian\nSuites: bookworm\n"
        "Components: main\n"
    )
    (apt_etc / "sources.list.d" / "ubuntu.list").write_text(
        "deb http://ubuntu.invalid/ubuntu jammy main\n"
    )
    result = sources(apt_etc)
    assert result.returncode != 0
    assert "no Debian" in result.stderr
