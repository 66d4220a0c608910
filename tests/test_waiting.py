"""A wait that times out says what it saw and where the logs are (tests/support/waiting.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.etcd import eventually, wait_for
from tests.support.waiting import Compared


def test_a_comparison_that_never_holds_reports_both_sides_and_the_logs(tmp_path: Path) -> None:
    (tmp_path / "reloader0").mkdir()
    (tmp_path / "reloader0" / "reloader.log").write_text("...")
    seen = Compared(
        "HAProxy vs etcd",
        {"web": {"10.0.0.1:80", "10.0.0.2:80"}, "api": {"10.0.0.9:80"}},
        {"web": {"10.0.0.1:80", "10.0.0.3:80"}, "api": {"10.0.0.9:80"}},
    )
    with pytest.raises(AssertionError) as failed:
        wait_for(lambda: seen, timeout=0.1, what="HAProxy equal to etcd")
    assert str(failed.value).splitlines() == [
        "timed out after 0.1s waiting for HAProxy equal to etcd",
        "  last seen: HAProxy vs etcd: web: got {10.0.0.1:80, 10.0.0.2:80}, "
        "want {10.0.0.1:80, 10.0.0.3:80} (missing {10.0.0.3:80}, extra {10.0.0.2:80})",
        f"  logs kept in {tmp_path}: reloader0/reloader.log",
    ]


async def test_the_last_answer_and_the_last_error_are_reported(tmp_path: Path) -> None:
    answers = iter([3, 3])

    def flaky() -> int:
        answer = next(answers, None)
        if answer is None:
            raise ConnectionRefusedError("status address closed")
        return answer - 3

    with pytest.raises(AssertionError) as failed:
        await eventually(flaky, timeout=0.2, what="the reloader")
    text = str(failed.value)
    assert "last answer: 0" in text
    assert "last error: ConnectionRefusedError('status address closed')" in text
    assert Compared("x", {1}, {1}) and not Compared("x", {1}, {2})
