#!/usr/bin/env python3
"""Publish and consume integration events from Python, per CONTRACT §1, with pika (pip install pika).

    interop.py publish --url URL --exchange EX --type TYPE --payload JSON [--partition-key K] [--source NAME]
    interop.py consume --url URL --exchange EX --queue QUEUE --type TYPE [--timeout S]

`publish` sends one event the way the framework's relay does (persistent, mandatory, publisher confirms,
metadata in properties and headers, the payload alone as the body) and prints its id.
`consume` declares QUEUE (durable) bound to TYPE, prints "ready", waits for one event, acknowledges it after
handling, and prints it as one JSON line: id, type, payload and metadata. Deduplicate on `message_id`.
"""
import argparse
import datetime
import json
import sys
import time
import uuid
import zlib

import pika


def connect(url):
    connection = pika.BlockingConnection(pika.URLParameters(url))
    return connection, connection.channel()


def declare_exchange(channel, exchange):
    # Same declaration as the framework's: topic, durable (declaring it again with the same settings is a no-op).
    channel.exchange_declare(exchange=exchange, exchange_type="topic", durable=True)


def publish(args):
    connection, channel = connect(args.url)
    declare_exchange(channel, args.exchange)
    channel.confirm_delivery()
    event_id = str(uuid.uuid4())
    now = datetime.datetime.now(datetime.timezone.utc)
    headers = {
        "x-event-version": 1,
        "x-occurred-at": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }
    if args.partition_key:
        headers["x-partition-key"] = args.partition_key
        # Spreads the key over partitioned consumer groups' partitions (docs/partitions.md): CRC-32 mod 64.
        headers["partition-bucket"] = str(zlib.crc32(args.partition_key.encode("utf-8")) % 64)
    properties = pika.BasicProperties(
        message_id=event_id,
        type=args.type,
        content_type="application/json",
        delivery_mode=2,
        timestamp=int(now.timestamp()),
        correlation_id=event_id,
        app_id=args.source,
        headers=headers,
    )
    body = json.dumps(json.loads(args.payload)).encode("utf-8")
    # mandatory: a message no queue takes comes back as an error instead of vanishing.
    channel.basic_publish(args.exchange, args.type, body, properties, mandatory=True)
    connection.close()
    print(event_id, flush=True)


def consume(args):
    connection, channel = connect(args.url)
    declare_exchange(channel, args.exchange)
    channel.queue_declare(queue=args.queue, durable=True)
    channel.queue_bind(queue=args.queue, exchange=args.exchange, routing_key=args.type)
    print("ready", flush=True)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        method, properties, body = channel.basic_get(queue=args.queue, auto_ack=False)
        if method is None:
            time.sleep(0.05)
            continue
        headers = properties.headers or {}
        event = {
            "id": properties.message_id,
            "type": properties.type,
            "content_type": properties.content_type,
            "delivery_mode": properties.delivery_mode,
            "correlation_id": properties.correlation_id,
            "source": properties.app_id,
            "version": headers.get("x-event-version"),
            "occurred_at": headers.get("x-occurred-at"),
            "causation_id": headers.get("x-causation-id"),
            "partition_key": headers.get("x-partition-key"),
            "outbox_seq": headers.get("x-outbox-seq"),
            "payload": json.loads(body),
        }
        print(json.dumps(event), flush=True)
        # Acknowledge only once the event is handled: a crash before this redelivers it.
        channel.basic_ack(method.delivery_tag)
        connection.close()
        return 0
    print("no event within the timeout", file=sys.stderr)
    return 1


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("publish")
    p.add_argument("--url", required=True)
    p.add_argument("--exchange", default="bus.events")
    p.add_argument("--type", required=True)
    p.add_argument("--payload", required=True)
    p.add_argument("--partition-key")
    p.add_argument("--source", default="python-service")
    c = sub.add_parser("consume")
    c.add_argument("--url", required=True)
    c.add_argument("--exchange", default="bus.events")
    c.add_argument("--queue", required=True)
    c.add_argument("--type", required=True)
    c.add_argument("--timeout", type=float, default=30)
    args = parser.parse_args()
    if args.command == "publish":
        publish(args)
        return 0
    return consume(args)


if __name__ == "__main__":
    sys.exit(main())
