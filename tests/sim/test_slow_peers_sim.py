"""No false deaths of slow peers, and the checks that say so can fail.

Lifeguard's slow-peer test (Dadgar et al., 2018): 5 of 100 peers handle every datagram 2 s late
(a peer whose event loop is held up by other work); nobody crashes, so every "dead" is false.
The mutation tests switch one mechanism off at a time and show the same checks then fail:
refutation, Lifeguard's local health (which also stretches a slow peer's own suspicion timeouts:
it hears refutations as late as it answers), indirect probes. bench/sim_membership.py runs the
slow-peer test over 30 seeds of 60 s.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from drekifs.cluster.swim import Membership, SwimConfig

from ..harness.simnet import SimWorld
from ..harness.swim_cluster import LAN_LATENCY, NoRefutation, SimCluster, slow_peer_run

CONFIG = SwimConfig()


async def slow_peer_deaths(
    seed: int,
    seconds: float,
    config: SwimConfig = CONFIG,
    membership: type[Membership] = Membership,
) -> list:
    async with SimWorld(seed=seed, latency=LAN_LATENCY) as world:
        cluster = SimCluster(world, 100, config, membership=membership)
        result = await slow_peer_run(cluster, slow=5, late=2.0, duration=seconds, rng_seed=seed)
        assert result.suspicions > 0  # the slow peers were suspected: the test did bite
        return result.deaths


@pytest.mark.parametrize("seed", [0, 1])
async def test_slow_peers_are_not_declared_dead(autojump_clock: Any, seed: int) -> None:
    assert await slow_peer_deaths(seed, 30) == []


async def test_slow_peers_die_without_refutation(autojump_clock: Any) -> None:
    assert await slow_peer_deaths(0, 15, membership=NoRefutation)


async def test_slow_peers_die_without_local_health(autojump_clock: Any) -> None:
    # Seed 0: slow node0005 declares slow node0097 dead at 5.98 s, having heard its refutation
    # 2 s late on a suspicion timer that did not know node0005 was slow.
    deaths = await slow_peer_deaths(0, 8, SwimConfig(awareness_max_multiplier=1))
    assert [(o.observer, o.subject) for o in deaths] == [("node0005", "node0097")]


async def lossy_run(
    config: SwimConfig, membership: type[Membership] = Membership
) -> tuple[int, int]:
    """The 10%-loss check of test_membership_sim, 45 s: ("dead" reports, failed probes of live
    peers, i.e. false accusations)."""
    async with SimWorld(seed=8, loss=0.10, delay=(0.0005, 0.01)) as world:
        cluster = SimCluster(world, 30, config, membership=membership)
        cluster.start_converged(cluster.names)
        await trio.sleep(45)
        deaths = sum(o.state == "dead" for o in cluster.observations)
        return deaths, sum(p.counters["probe_failures"] for p in cluster.peers.values())


async def test_lossy_check_fails_without_refutation(autojump_clock: Any) -> None:
    assert (await lossy_run(CONFIG))[0] == 0
    assert (await lossy_run(CONFIG, NoRefutation))[0] > 0


async def test_indirect_probes_keep_false_accusations_rare(autojump_clock: Any) -> None:
    """Without indirect probes every lost ping or ack is an accusation. Refutation still saves
    the accused (no death at 10% loss in bench or test), so what fails here is the rate."""
    deaths, accusations = await lossy_run(CONFIG)
    _, without = await lossy_run(SwimConfig(indirect_checks=0))
    assert deaths == 0 and accusations <= 0.02 * 30 * 45  # 1 probe in 50 at most
    assert without > 5 * accusations and without > 0.08 * 30 * 45, (accusations, without)
