"""Commands that move messages: ``req``, ``pub``, ``sub``, ``push``, ``pull`` (``submit`` is in
:mod:`.tasks`). Bodies are JSON, from the argument or one value per stdin line."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Callable, Iterator

import click

from ..core.records import VIA_KIND, EndpointKind
from ..errors import FabricTimeoutError, NoProviderError
from ..node import Node
from ..patterns.pubsub import Publisher
from .config import (
    Body,
    CliConfig,
    EndpointName,
    JsonBody,
    NodeName,
    common,
    next_wait,
    parse_body,
    pass_config,
)
from .output import BadInput, NotFound, dumps, emit, plural, printable

#: How often `push --via` asks the streamer whether it has a puller yet (s).
DEVICE_POLL_S = 0.05


def via_option(device: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--via", type=NodeName(), metavar="NODE",
                        help=f"Go through the {device} device node NODE (`zmqfabric device "
                             f"{device} NAME` runs one) instead of straight to the providers.")


@click.command("req")
@click.argument("service", type=EndpointName("service"))
@click.argument("body", metavar="[JSON]", required=False, type=JsonBody())
@click.option("--retries", type=click.IntRange(min=0), default=0, show_default=True,
              help="Further attempts (to the next provider) after a timeout.")
@via_option("queue")
@common
@pass_config
def req_cmd(cfg: CliConfig, service: str, body: Body | None, retries: int,
            via: str | None) -> None:
    """Call SERVICE with the JSON body and print the reply (one per stdin line without JSON)."""
    with cfg.observer() as node, explain_refused(node):
        if via is not None:
            check_via(node, via, EndpointKind.REPLY, service, cfg.timeout)
        for value in bodies(body):
            reply = node.request(service, value, timeout=cfg.timeout, retries=retries, via=via)
            if cfg.json:
                emit(reply)
            else:
                click.echo(dumps(reply, indent=2))


@click.command("pub")
@click.argument("stream", type=EndpointName("stream"))
@click.argument("topic")
@click.argument("body", metavar="[JSON]", required=False, type=JsonBody())
@click.option("--wait-subscribers", type=click.IntRange(min=0), default=1, show_default=True,
              help="Before publishing, wait up to --timeout for N subscribers to subscribe.")
@common
@pass_config
def pub_cmd(cfg: CliConfig, stream: str, topic: str, body: Body | None,
            wait_subscribers: int) -> None:
    """Publish JSON bodies on STREAM under TOPIC (one per stdin line without JSON).

    Pub/sub drops messages sent before a subscription reaches the publisher, so this first
    waits until --wait-subscribers fabric subscribers (default 1) have subscribed, for at most
    --timeout, then publishes anyway with a warning. Subscribers behind a forwarder device count
    (the forwarder itself does not); plain ZeroMQ SUB programs receive but are not counted.
    Publishing goes out as node cli-PID-XXXX (or --name), listed while it runs."""
    with cfg.member() as node:
        publisher = node.publisher(stream)
        subscribers = _wait_subscribers(publisher, wait_subscribers, cfg.timeout)
        if subscribers < wait_subscribers:
            click.echo(f"warning: {subscribers} of {wait_subscribers} subscriber(s) subscribed to "
                       f"stream {stream!r} within {cfg.timeout:g} s; publishing anyway "
                       "(messages nobody is subscribed to are dropped)", err=True)
        sent = 0
        for value in bodies(body):
            publisher.send(topic, value)
            sent += 1
    if cfg.json:
        emit({"stream": stream, "topic": topic, "sent": sent, "subscribers": subscribers})
    else:
        click.echo(f"published {plural(sent, 'message')} on stream {stream!r} (topic {topic!r}, "
                   f"{plural(subscribers, 'subscriber')} subscribed)")


def _wait_subscribers(publisher: Publisher, wanted: int, timeout: float) -> int:
    """Wait up to ``timeout`` s for ``wanted`` subscriptions applied; return how many are."""
    if wanted <= 0:
        return publisher.subscribers
    return publisher.wait_subscribers(wanted, timeout)


@click.command("sub")
@click.argument("stream", type=EndpointName("stream"))
@click.argument("topics", nargs=-1)
@click.option("--count", type=click.IntRange(min=1), help="Exit after N messages.")
@via_option("forwarder")
@common
@pass_config
def sub_cmd(cfg: CliConfig, stream: str, topics: tuple[str, ...], count: int | None,
            via: str | None) -> None:
    """Print messages of STREAM whose topic starts with one of TOPICS (default: all).

    Runs until Ctrl-C, --count messages, or an explicit --timeout (exit 4 if --count was not
    reached by then). With --via, the forwarder node must be found within --timeout."""
    with cfg.observer() as node:
        if via is not None:
            check_via(node, via, EndpointKind.STREAM, stream, cfg.timeout)
        sub = node.subscribe(stream, list(topics) or None, via=via)
        which = ", ".join(repr(t) for t in topics) if topics else "all topics"
        through = f" via {via}" if via else ""
        click.echo(f"subscribed to stream {stream!r}{through} ({which}); Ctrl-C to stop",
                   err=True)
        _receive(cfg, f"stream {stream!r}", sub.recv_message, count)


@click.command("push")
@click.argument("pipeline", type=EndpointName("pipeline"))
@click.argument("body", metavar="[JSON]", required=False, type=JsonBody())
@via_option("streamer")
@common
@pass_config
def push_cmd(cfg: CliConfig, pipeline: str, body: Body | None, via: str | None) -> None:
    """Send JSON bodies into PIPELINE, round robin over its pullers (stdin lines without JSON).

    Exit 3 if no puller is there within --timeout; with --via, if the streamer has none."""
    sent = 0
    with cfg.observer() as node, explain_refused(node):
        deadline = time.monotonic() + cfg.timeout
        if via is not None:
            check_via(node, via, EndpointKind.PIPELINE, pipeline, cfg.timeout)
            wait_device_providers(node, via, f"streamer:{pipeline}", deadline,
                                  NoProviderError("pipeline", pipeline, cfg.timeout))
        pusher = node.pusher(pipeline, via=via)
        if not pusher.wait_ready(max(deadline - time.monotonic(), 0.001)):
            raise NoProviderError("pipeline", pipeline, cfg.timeout)
        for value in bodies(body):
            pusher.send(value, timeout=cfg.timeout)
            sent += 1
    if cfg.json:
        emit({"pipeline": pipeline, "sent": sent})
    else:
        click.echo(f"pushed {plural(sent, 'message')} into pipeline {pipeline!r}")


@click.command("pull")
@click.argument("pipeline", type=EndpointName("pipeline"))
@click.option("--count", type=click.IntRange(min=1), help="Exit after N messages.")
@common
@pass_config
def pull_cmd(cfg: CliConfig, pipeline: str, count: int | None) -> None:
    """Take messages from PIPELINE and print them. Offers the pipeline as node cli-PID-XXXX (or
    --name). Runs until Ctrl-C, --count messages, or an explicit --timeout."""
    with cfg.member() as node:
        puller = node.puller(pipeline)
        click.echo(f"pulling from pipeline {pipeline!r} as node {node.name}; Ctrl-C to stop",
                   err=True)
        _receive(cfg, f"pipeline {pipeline!r}", puller.recv_message, count)


def _receive(cfg: CliConfig, what: str, recv: Callable[[float], Any], count: int | None) -> None:
    deadline = cfg.deadline
    received = 0
    while count is None or received < count:
        slice_s = next_wait(deadline)
        if slice_s is None:
            break
        message = recv(slice_s)
        if message is None:
            continue
        received += 1
        if cfg.json:
            row = {"topic": message.topic} if message.topic is not None else {}
            emit({**row, "body": message.body, "id": message.msg_id, "ts": message.timestamp})
        elif message.topic is not None:
            click.echo(f"{printable(message.topic)}  {dumps(message.body)}")
        else:
            click.echo(dumps(message.body))
    if count is not None and received < count:
        raise FabricTimeoutError(f"received {received} of {count} messages on {what} within "
                                 f"{cfg.timeout:g} s", timeout=cfg.timeout)


# --- shared by the message commands ------------------------------------------------------------


@contextlib.contextmanager
def explain_refused(node: Node) -> Iterator[None]:
    """Turn "no node offers X" into "X is offered by a node refused for security reasons" when
    that is why (e.g. a secured provider and a command without --keys). Exit code 3 either way."""
    try:
        yield
    except NoProviderError as exc:
        for record, reason in node.refused_peers():
            if any(e.kind.noun == exc.kind and e.name == exc.name for e in record.endpoints):
                raise NotFound(f"no node this one may talk to offers {exc.kind} {exc.name!r}: "
                               f"node {record.name} on {record.host} does, but {reason}") from exc
        raise


def check_via(node: Node, via: str, kind: EndpointKind, name: str, timeout: float) -> None:
    """Wait until node ``via`` is known and relays ``kind`` endpoint ``name``.

    Raises NodeNotFoundError, or NotFound when the node is there but is no such device."""
    front = VIA_KIND[kind]
    record = node.wait_for_node(via, timeout)

    def relays() -> bool:
        found = node.directory.get(via)
        return found is not None and found.find(front, name) is not None

    if record.find(front, name) is None and not node.directory.wait_for(relays, timeout):
        raise NotFound(f"node {via!r} is no {front.noun} for {kind.noun} {name!r} (waited "
                       f"{timeout:g} s); start one with `zmqfabric device "
                       f"{front.noun.split()[0]} {name} --name {via}`")


def wait_device_providers(node: Node, via: str, section: str, deadline: float,
                          error: Exception) -> None:
    """Wait until device ``section`` of node ``via`` is connected to a provider (a streamer
    with no puller would take messages and hold them); raise ``error`` at ``deadline``. Asks
    the device node's stats each DEVICE_POLL_S; a stats call still unanswered at ``deadline``
    counts as no provider. Raises FabricError as control calls do (refused keys, ...)."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise error
        try:
            found = node.stats(via, timeout=left).get(section)
        except FabricTimeoutError:  # its answer would come after the deadline: none in time
            raise error from None
        if isinstance(found, dict) and isinstance(found.get("providers"), int) \
                and found["providers"] > 0:
            return
        time.sleep(min(DEVICE_POLL_S, max(deadline - time.monotonic(), 0.0)))


def bodies(body: Body | None) -> Iterator[Any]:
    """The argument's value, or one JSON value per non-blank stdin line. Raises BadInput for a
    closed or empty stdin and for a line that is not UTF-8 or not a usable JSON value; says what
    it waits for when stdin is a terminal."""
    if body is not None:
        yield body.value
        return
    if sys.stdin is None or sys.stdin.closed:
        raise BadInput("no JSON body: give one as an argument, or JSON lines on stdin (stdin is "
                       "closed)")
    if sys.stdin.isatty():
        click.echo("reading JSON bodies from the terminal, one per line; Ctrl-D to end (or give "
                   "the body as an argument)", err=True)
    given = 0
    for lineno, raw in enumerate(click.get_binary_stream("stdin"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadInput(f"stdin line {lineno} is not UTF-8 text") from exc
        if not line.strip():
            continue
        given += 1
        yield parse_body(line, f"stdin line {lineno}")
    if not given:
        raise BadInput("no JSON body: stdin was empty; give a body as an argument, or JSON "
                       "lines on stdin")
