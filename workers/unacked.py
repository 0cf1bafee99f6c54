"""The messages a worker holds unacknowledged (tasks running, or waiting for their ETA):
kept visible while the worker lives, handed back at once when its Redis connection breaks.

With the Redis transport a delivered message stays in Redis (`unacked`, `unacked_index`)
until acknowledged, and any worker's sweep puts it back in its queue once it is older
than the visibility timeout. So that the timeout can be short (a killed worker's messages
come back within minutes) whatever a task's length, every worker refreshes the age of the
messages it holds every quarter of the timeout (`KeepVisible`): only a dead or frozen
worker's messages age.

When the connection breaks (Redis restarts), Celery drops the messages it held and kombu
(5.7) tries to put them back in their queues with Redis down; it also closed the
transport first, so the attempt raised `AttributeError: 'NoneType' object has no attribute
'hostname'` and killed the worker, and the messages came back only after the timeout.
`_restore_unacked` keeps their delivery tags instead, and `KeepVisible` puts them back as
soon as the worker is connected again.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery, bootsteps
from kombu.transport import redis as kombu_redis

logger = logging.getLogger(__name__)
_original_restore_unacked = kombu_redis.QoS.restore_unacked
_to_hand_back: list[str] = []  # delivery tags held when the connection broke


def _restore_unacked(qos: Any, client: Any = None) -> None:
    tags = [str(tag) for tag in qos._delivered]
    try:
        _original_restore_unacked(qos, client)
    except Exception as error:  # Redis down, or kombu's transport closed under it
        logger.warning("%d unacknowledged message(s) handed back once reconnected (%r)",
                       len(tags), error)  # fmt: skip
        _to_hand_back.extend(tags)
        qos._delivered.clear()


class KeepVisible(bootsteps.StartStopStep):
    """Consumer step: refresh the held messages' age; hand back those of a broken
    connection."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.timer_entry: Any = None

    def start(self, consumer: Any) -> None:
        interval = max(1.0, consumer.app.conf.broker_transport_options["visibility_timeout"] / 4)
        self.tick(consumer)
        self.timer_entry = consumer.timer.call_repeatedly(interval, self.tick, (consumer,))

    def stop(self, consumer: Any) -> None:
        if self.timer_entry is not None:
            self.timer_entry.cancel()
            self.timer_entry = None

    shutdown = stop

    def tick(self, consumer: Any) -> None:
        try:
            channel = consumer.task_consumer.channel
            hand_back(channel)
            refresh(channel)
        except Exception as error:  # Redis unreachable: the next tick tries again
            logger.warning("could not refresh the unacknowledged messages: %r", error)


def hand_back(channel: Any) -> None:
    """Put back in their queues the messages held when the connection broke (a tag
    already handed back, or that Redis lost, is a no-op)."""
    while _to_hand_back:
        channel.qos.restore_by_tag(_to_hand_back[0])
        _to_hand_back.pop(0)


def refresh(channel: Any) -> None:
    tags = [str(tag) for tag in channel.qos._delivered]
    if tags:
        now = time.time()
        with channel.conn_or_acquire() as client:
            client.zadd(channel.unacked_index_key, dict.fromkeys(tags, now), xx=True)


def install(app: Celery) -> None:
    kombu_redis.QoS.restore_unacked = _restore_unacked  # type: ignore[method-assign,assignment]
    app.steps["consumer"].add(KeepVisible)
