"""The scenarios and the two profiles that pick and size them.

A scenario is a shape of channels (subscribers and publishers on each) and a way to publish
(``window``: as fast as the server delivers, with a bounded number of incomplete messages per
publisher; ``rate``: a fixed total rate; ``idle``: connections held, nothing sent). Channels
named ``f1:...``/``f3:...`` run 1 or 3 pass-through functions on Echo (bench/project); the
baselines have no functions, so a middleware scenario is run on Echo only and compared with
the baselines' plain routing of the same shape (``compare_to``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

Channel = tuple[str, int, int, bool]  # (name, subscribers, publishers, publishers are subscribers)
Placement = tuple[tuple[int, ...], tuple[int, ...]]  # (subscribers' nodes, publishers' nodes)


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    channels: tuple[Channel, ...]
    mode: str = "window"
    window: int = 8
    rate: float = 0
    warmup: float = 1
    measure: float = 5
    drain: float = 30  # at most; the generator stops waiting once deliveries stop arriving (3 s)
    idle: float = 0
    nodes: int = 1
    rounds: int = 1  # best of N, each round on fresh servers, targets in alternating order
    targets: tuple[str, ...] = ("echo", "node", "pysio")
    compare_to: str | None = None  # the plain scenario whose baseline rows an Echo-only one is held to
    idle_name: str | None = None  # also report the idle phase as its own row of this name
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    placement: tuple[Placement, ...] = ()  # one per channel, or none: round robin over the nodes
    quiet_nodes: tuple[int, ...] = ()  # nodes serving no published channel
    over_redis: bool = False  # on Redis even with one node (the 1-node point of a scale-out series)
    group: str | None = None  # scenarios reported together (the scale-out series)
    history_of: str | None = None  # the same shape with history off (Echo being built only)
    connect_concurrency: int = 100  # connections the generator opens at once (a storm: more)

    @property
    def needs_redis(self) -> bool:
        return self.nodes > 1 or self.over_redis

    @property
    def connections(self) -> int:
        return sum(subs + (0 if both else pubs) for _, subs, pubs, both in self.channels)

    @property
    def deadline(self) -> float:
        connect = 30 + self.connections / 100  # generous: a slow server still finishes
        return connect + self.idle + self.warmup + self.measure + self.drain + 30

    def loadgen_config(self, urls: list[str], token: str) -> dict[str, Any]:
        channels: list[dict[str, Any]] = [
            {"name": name, "subs": subs, "pubs": pubs, "pubsAreSubs": both}
            for name, subs, pubs, both in self.channels
        ]
        for channel, (subs_on, pubs_on) in zip(channels, self.placement, strict=False):
            channel.update(subsOn=list(subs_on), pubsOn=list(pubs_on))
        return {
            "urls": urls,
            "namespace": "/bench",
            "token": token,
            "channels": channels,
            "mode": self.mode,
            "window": self.window,
            "rate": self.rate,
            "warmup": self.warmup,
            "measure": self.measure,
            "drain": self.drain,
            "idle": self.idle,
            "payloadBytes": 100,
            "connectConcurrency": self.connect_concurrency,
            "connectTimeout": 30,
            "msgTimeout": 10,
            "maxMessages": 2_000_000,
            "deadline": self.deadline,
        }


def fanout(subs: int, prefix: str = "") -> tuple[Channel, ...]:
    return ((f"{prefix}fan", subs, 1, False),)


def rooms(channels: int = 20, subs: int = 10, pubs_per_channel: int = 10, prefix: str = "",
          pubs_are_subs: bool = False) -> tuple[Channel, ...]:
    return tuple((f"{prefix}room-{i}", subs, pubs_per_channel, pubs_are_subs) for i in range(channels))


def _base(measure: float, warmup: float, drain: float = 30) -> list[Scenario]:
    return [
        Scenario("fanout-100", "1 publisher → 100 subscribers, as fast as accepted",
                 fanout(100), window=8, measure=measure, warmup=warmup, drain=drain),
        Scenario("fanout-1000", "1 publisher → 1,000 subscribers, as fast as accepted",
                 fanout(1000), window=4, measure=measure, warmup=warmup, drain=drain),
        Scenario("fixed-200-100", "1 publisher → 100 subscribers at 200 msg/s (latency)",
                 fanout(100), mode="rate", rate=200, window=1000, measure=measure, warmup=warmup,
                 drain=drain),
        Scenario("rooms-20x10", "200 publishers on 20 channels x 10 subscribers",
                 rooms(), window=2, measure=measure, warmup=warmup, drain=drain),
    ]


SCALE_CHANNELS = 1000
SCALE_SUBS = 3  # per channel, all on the channel's node
QUIET_SUBS = 10  # held by the quiet node, on a channel nobody publishes to


def scale_out(nodes: int, measure: float, warmup: float, quiet: bool = False) -> Scenario:
    """1,000 channels over ``nodes`` nodes on one Redis, each channel's subscribers on one node.

    Channel i's 3 subscribers sit on node i mod N (channels spread evenly); its publisher sits
    on another node, alternating over the others, so with 2+ nodes every publish crosses nodes
    and every node publishes as much as it delivers. ``quiet`` adds one more node holding 10
    subscribers of a channel nobody publishes to: a node that serves none of the traffic, whose
    CPU during the window is what a node spends on channels it does not serve.
    """
    channels: list[Channel] = [(f"chan-{i}", SCALE_SUBS, 1, False) for i in range(SCALE_CHANNELS)]
    placement: list[Placement] = []
    for i in range(SCALE_CHANNELS):
        home = i % nodes
        publisher = home if nodes == 1 else (home + 1 + (i // nodes) % (nodes - 1)) % nodes
        placement.append(((home,), (publisher,)))
    quiet_nodes: tuple[int, ...] = ()
    if quiet:
        channels.append(("quiet", QUIET_SUBS, 0, False))
        placement.append(((nodes,), (nodes,)))
        quiet_nodes = (nodes,)
    name = f"scale-{nodes}" + ("-quiet" if quiet else "")
    title = (f"{SCALE_CHANNELS:,} channels x {SCALE_SUBS} subscribers on {nodes} node(s) over one "
             "Redis, each channel on one node, publishers on the other nodes"
             + (", plus a quiet node serving none of them" if quiet else ""))
    return Scenario(name, title, tuple(channels), window=2, measure=measure, warmup=warmup,
                    nodes=nodes + (1 if quiet else 0), over_redis=True, targets=("echo", "node"),
                    placement=tuple(placement), quiet_nodes=quiet_nodes, group="scale-out",
                    notes="every publish crosses nodes (2+ nodes); the quiet node's CPU is "
                          "reported apart")


def scale_series(measure: float, warmup: float) -> list[Scenario]:
    """The scale-out series: 1, 2 and 3 nodes, then 3 nodes and a quiet one."""
    return [*(scale_out(n, measure, warmup) for n in (1, 2, 3)), scale_out(3, measure, warmup, quiet=True)]


def _middleware(measure: float, warmup: float, which: tuple[str, ...]) -> list[Scenario]:
    out = []
    for n in (1, 3):
        if "fanout" in which:
            out.append(Scenario(
                f"fanout-100-f{n}", f"1 → 100 subscribers through {n} function(s)",
                fanout(100, f"f{n}:"), window=8, measure=measure, warmup=warmup,
                targets=("echo",), compare_to="fanout-100"))
        if "rooms" in which:
            out.append(Scenario(
                f"rooms-20x10-f{n}", f"200 publishers, 20 channels x 10, through {n} function(s)",
                rooms(prefix=f"f{n}:"), window=2, measure=measure, warmup=warmup,
                targets=("echo",), compare_to="rooms-20x10"))
    return out


def with_history(plain: Scenario) -> Scenario:
    """``plain`` on channels that keep history (``h:``): what history costs per delivery."""
    channels = tuple(("h:" + name, subs, pubs, both) for name, subs, pubs, both in plain.channels)
    return replace(plain, name=plain.name + "-hist", title=plain.title + ", history on",
                   channels=channels, targets=("echo",), compare_to=plain.name,
                   history_of=plain.name, idle=0, idle_name=None)


IDLE_MAX = 19_000
"""Connections of the biggest idle row: this machine's per-process open-file limit is a hard
20,000 that root cannot raise (no CAP_SYS_RESOURCE), and server and generator each hold one
descriptor per connection, so 50,000 on one node cannot be tried here."""


def connections() -> list[Scenario]:
    """What a connection costs: a connect storm (a node restart: every client at once) and the
    most idle connections this machine lets one process hold."""
    return [
        Scenario("connect-storm-5k", "5,000 clients connect, authenticate and subscribe, 1,000 "
                 "at a time (a node restart), then idle", rooms(100, 50, 0), mode="idle",
                 idle=2, connect_concurrency=1000,
                 notes="connects/s and server CPU per connect, from the first connect to the "
                       "last subscribe ack"),
        Scenario(f"idle-{IDLE_MAX // 1000}k", f"{IDLE_MAX:,} idle subscribers on 1,000 channels",
                 rooms(1000, IDLE_MAX // 1000, 0), mode="idle", idle=10, connect_concurrency=500,
                 targets=("echo", "node"),
                 notes="the per-process open-file limit here (20,000, hard) bounds it: 50,000 "
                       "could not be opened on this machine"),
    ]


def quick() -> list[Scenario]:
    """Under 2 minutes on 2 cores: the core shapes, short windows, no 10k-connection runs."""
    measure, warmup = 2.5, 0.5
    scenarios = _base(measure, warmup, drain=15)
    # the 1,000 subscribers held idle for a second before they are published to
    scenarios[1] = replace(scenarios[1], idle=1, idle_name="idle-1000")
    scenarios += _middleware(measure, warmup, ("fanout",))[:1]
    scenarios.append(with_history(scenarios[0]))
    return scenarios


def full() -> list[Scenario]:
    measure, warmup = 8, 2
    scenarios = _base(measure, warmup)
    scenarios += _middleware(measure, warmup, ("fanout", "rooms"))
    scenarios += [
        Scenario("seed-10k-1hz", "10,000 subscribers on one channel at 1 msg/s (seed: 10k x 1/s)",
                 fanout(10_000), mode="rate", rate=1, window=1000, idle=5, measure=10, warmup=1,
                 drain=60, idle_name="idle-10k",
                 notes="the idle phase before it is reported as idle-10k"),
        Scenario("seed-5k-chain", "5,000 connections publishing 833 msg/s in total through 1 function "
                 "(500 channels x 10; seed: 50k connections, 1 msg/min each, via a Lambda)",
                 rooms(500, 10, 10, prefix="f1:", pubs_are_subs=True), mode="rate", rate=833,
                 window=4, measure=measure, warmup=warmup,
                 notes="baselines run the same traffic without the function"),
    ]
    scenarios += connections()
    scale = [s for s in _base(measure, warmup)]
    scale.append(next(s for s in scenarios if s.name == "seed-10k-1hz"))
    scenarios += [
        replace(s, name=f"redis2-{s.name}", title=f"2 nodes on Redis: {s.title}", nodes=2,
                idle_name=s.idle_name and f"redis2-{s.idle_name}")
        for s in scale
    ]
    scenarios += [with_history(s) for s in scenarios
                  if s.name in ("fanout-100", "rooms-20x10", "redis2-fanout-100", "redis2-rooms-20x10")]
    scenarios += scale_series(measure, warmup)
    # best of 2 where a round is cheap: the machine is shared, so one unlucky window is likely
    return [replace(s, rounds=2) if s.connections <= 2000 else s for s in scenarios]


PROFILES = {"quick": quick, "full": full}
