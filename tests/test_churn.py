"""Records that vanish without draining, under load (issue 22), on real parts: a 3-member
etcd, real reloaders with their HAProxy, app processes killed with SIGKILL, request loops
with and without keep-alive. The figures for the full-length scenarios are bench rows
(R-CHURN, R-NODE, R-MASS); these are shorter runs of the same code with the same bars."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed import churn
from testbed.etcd import Etcd


def test_abrupt_churn_fails_at_most_one_request_a_replacement_and_never_holds(
    etcd3: Etcd, tmp_path: Path
) -> None:
    """One instance replaced a second (the new one registered, the old process killed and
    its record deleted at once): before the guard judged capacity, this read as a mass
    removal, held dead servers and failed 38 % of requests."""
    figures = churn.abrupt_churn(tmp_path, etcd3, interval=1.0, seconds=8, edges=2)
    assert figures.changes >= 6, figures
    assert figures.holds == 0, f"the guard held a service that kept its capacity: {figures}"
    assert figures.failed <= figures.changes, figures.failures
    assert figures.requests > 1000, figures


@pytest.mark.timeout(180)
def test_a_node_dying_with_3_of_4_instances_fails_only_what_was_in_flight(
    etcd3: Etcd, tmp_path: Path
) -> None:
    """Processes and companion sidekicks killed at once; the records stay until their
    leases run out, then go together (a hold). Requests that meet a dead server are
    retried on the live one; a dead server leaves rotation at its first refused
    connection, held or not."""
    figures = churn.node_death(tmp_path, etcd3, ttl=3, after=8, edges=2)
    bound = figures.extra["in_flight_bound"]
    assert figures.failed <= bound, f"{figures.failed} failed > {bound} in flight: {figures}"
    assert figures.requests > 1000, figures


def test_mass_deletion_of_live_instances_fails_nothing_within_the_hold(
    etcd3: Etcd, tmp_path: Path
) -> None:
    figures = churn.mass_deletion(tmp_path, etcd3, instances=6, hold=3.0, edges=2)
    assert figures.failed == 0, figures.failures
    assert figures.holds == 2, figures  # one per edge
    assert figures.extra["released_s"] >= 3.0, figures  # and then gone (the scenario waits)
