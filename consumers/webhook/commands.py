"""Entry points of `cairn webhook` and `cairn webhook dead-letters`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import TextIO

from consumers.natsclient import NATS_ERRORS, connect_once
from consumers.webhook.config import ConfigError, WebhookConfig, load_config
from consumers.webhook.dead_letters import DeadLetter, DeadLetterStore
from consumers.webhook.delivery import build_request, http_client, send
from consumers.webhook.lookup import EventLookupFailed, registry_lookups
from consumers.webhook.options import nats_url_from
from consumers.webhook.payloads import EVENT_TYPES, ManifestFacts
from engine.bus.messages import is_stand_in


def main(args: argparse.Namespace) -> int:
    """Run the webhook command that ``args`` selects; return the exit status."""
    config_path: Path | None = getattr(args, "config", None)
    if config_path is None:
        command = "cairn webhook"
        if args.webhook_command is not None:
            command += f" dead-letters {args.dead_letters_command}"
        print(
            f"{command}: --config FILE is required: the TOML file with the NATS "
            f"settings and the [[endpoints]] (see {command} --help)",
            file=sys.stderr,
        )
        return 2
    try:
        config = load_config(config_path)
    except ConfigError as error:
        print(f"cairn webhook: {error}", file=sys.stderr)
        return 2
    nats_url = nats_url_from(args, config.nats_url)

    problem = _check_redeliver_endpoint(config, args)
    if problem is not None:
        print(f"cairn webhook dead-letters redeliver: {problem}", file=sys.stderr)
        return 2

    if args.webhook_command is None:
        from consumers.webhook.service import run_webhook

        return asyncio.run(run_webhook(config, nats_url))
    try:
        if args.dead_letters_command == "list":
            return asyncio.run(_list(config, nats_url, args, sys.stdout))
        return asyncio.run(_redeliver(config, nats_url, args, sys.stdout))
    except BrokenPipeError:
        # A closed standard output, which `cairn` itself reports.
        raise
    except ConnectionError as error:
        print(f"cairn webhook: {error}", file=sys.stderr)
        return 1


def _check_redeliver_endpoint(
    config: WebhookConfig, args: argparse.Namespace
) -> str | None:
    """Return a usage error when redeliver's --endpoint is not configured.

    redeliver can send only to a configured endpoint, so an unknown name is
    a mistake. `dead-letters list` accepts any name, because the dead
    letters of an endpoint removed from the configuration stay listed.
    """
    if getattr(args, "dead_letters_command", None) != "redeliver":
        return None
    if args.endpoint is None or config.endpoint(args.endpoint) is not None:
        return None
    names = ", ".join(endpoint.name for endpoint in config.endpoints)
    return f"endpoint {args.endpoint!r} not found in {args.config}: it defines {names}"


def _selected(letter: DeadLetter, args: argparse.Namespace) -> bool:
    return not args.event_id or letter.event_id in args.event_id


async def _list(
    config: WebhookConfig, nats_url: str, args: argparse.Namespace, out: TextIO
) -> int:
    client = await connect_once(nats_url, "cairn webhook dead-letters")
    try:
        store = DeadLetterStore(
            client.jetstream(), config.dead_letter_stream, config.dead_letter_prefix
        )
        count = invalid = 0
        async for letter in store.list(args.endpoint):
            if not _selected(letter, args):
                continue
            count += 1
            if letter.problem is not None:
                invalid += 1
            if args.json:
                out.write(json.dumps(letter.to_json(), separators=(",", ":")) + "\n")
            else:
                out.write(_format(letter) + "\n")
        if not args.json:
            summary = f"{count} dead letter(s)"
            if invalid:
                summary += f", {invalid} invalid, which redeliver keeps"
            out.write(summary + "\n")
        return 0
    finally:
        await client.close()


def _format(letter: DeadLetter) -> str:
    event = letter.event
    if letter.problem is not None:
        return "  ".join(
            [
                f"{letter.sequence:>6}",
                letter.failed_at or "?",
                letter.endpoint,
                letter.event_id or "?",
                f"invalid: {letter.problem}",
            ]
        )
    return "  ".join(
        [
            f"{letter.sequence:>6}",
            letter.failed_at,
            letter.endpoint,
            letter.event_id,
            f"position={event.get('position', '?')}",
            str(event.get("type", "?")),
            str(event.get("repository", "?")),
            f"attempts={letter.attempts}",
            f"error={letter.error}" if letter.error else "",
        ]
    ).rstrip()


async def _redeliver(
    config: WebhookConfig, nats_url: str, args: argparse.Namespace, out: TextIO
) -> int:
    """POST each selected dead letter once, and remove those that got a 2xx.

    Dead letters of endpoints no longer in the configuration are kept and
    reported, and so are the ones that fail again. A dead letter that contains
    a stand-in without its payload is sent with the full event read from
    the registry's event feed when ``[registry] url`` is set.
    """
    client = await connect_once(nats_url, "cairn webhook dead-letters")
    lookup, events = registry_lookups(config)
    delivered = failed = missing = 0
    try:
        store = DeadLetterStore(
            client.jetstream(), config.dead_letter_stream, config.dead_letter_prefix
        )
        letters = [
            letter
            async for letter in store.list(args.endpoint)
            if _selected(letter, args)
        ]
        found = {letter.event_id for letter in letters}
        for event_id in args.event_id or []:
            if event_id not in found:
                owner = f"endpoint {args.endpoint}" if args.endpoint else "any endpoint"
                out.write(
                    f"not found {event_id}: no dead letter of {owner} has this "
                    "event id\n"
                )
                missing += 1
        for letter in letters:
            if letter.problem is not None:
                out.write(
                    f"kept dead letter {letter.sequence}: invalid: {letter.problem}. "
                    "Read it with `cairn webhook dead-letters list --json`, and "
                    f"delete it with `nats stream rmm {store.stream} "
                    f"{letter.sequence}`\n"
                )
                failed += 1
                continue
            endpoint = config.endpoint(letter.endpoint)
            if endpoint is None:
                out.write(
                    f"kept {letter.event_id}: endpoint {letter.endpoint!r} is not "
                    "in the configuration\n"
                )
                failed += 1
                continue
            event = letter.event
            if events is not None and is_stand_in(event):
                try:
                    event = await events.event(int(event["position"]), str(event["id"]))
                except (EventLookupFailed, KeyError, TypeError, ValueError) as error:
                    out.write(
                        f"kept {letter.event_id}: its payload was omitted on NATS "
                        f"and reading the full event failed: {error}\n"
                    )
                    failed += 1
                    continue
            if event["type"] not in EVENT_TYPES:
                out.write(
                    f"kept {letter.event_id}: event type {event['type']!r} is "
                    "unknown to this cairn; redeliver it with a cairn version "
                    "that knows this type\n"
                )
                failed += 1
                continue
            facts: ManifestFacts | None = None
            digest = (event.get("payload") or {}).get("digest")
            if (
                lookup is not None
                and event.get("type") == "tag.set"
                and isinstance(digest, str)
            ):
                facts = await lookup.facts(str(event.get("repository")), digest)
            request = build_request(endpoint, event, config.registry_url, facts)
            async with http_client(endpoint) as http:
                outcome = await send(http, endpoint, request, letter.attempts + 1)
            if outcome.delivered:
                try:
                    await store.remove(letter.sequence)
                except NATS_ERRORS as error:
                    out.write(
                        f"delivered {letter.event_id} to {endpoint.name} but could "
                        f"not remove dead letter {letter.sequence}: {error}\n"
                    )
                    failed += 1
                    continue
                delivered += 1
                out.write(f"delivered {letter.event_id} to {endpoint.name}\n")
            else:
                failed += 1
                out.write(
                    f"failed {letter.event_id} to {endpoint.name}: {outcome.error}\n"
                )
    finally:
        if lookup is not None:
            await lookup.aclose()
        if events is not None:
            await events.aclose()
        await client.close()
    summary = f"{delivered} redelivered, {failed} kept"
    if missing:
        summary += f", {missing} not found"
    out.write(summary + "\n")
    return 0 if failed == 0 and missing == 0 else 1
