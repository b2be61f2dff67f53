"""The Celery application: two queues, JSON only, late acknowledgement.

* ``gpu`` carries analyses (``locus.analyse``), ``io`` carries exports (``locus.export``).
* Tasks take identifiers (study version id, export id), never pixel data.
* JSON is the only accepted content type: a pickle payload from a compromised broker
  would be code execution.
* ``acks_late`` + ``reject_on_worker_lost`` + prefetch 1: a message is acknowledged only
  after the task body finished, so a killed worker's task is redelivered. This is safe
  because every task is idempotent (keyed by study version / export row in the
  database, which is the source of truth; the broker is only the doorbell).

The embedded default broker is kombu's SQLAlchemy transport on a SQLite file under the
data directory, so a single machine needs no broker server.
"""

from __future__ import annotations

from celery import Celery

from node.settings import BrokerSettings

ANALYSE_TASK = "locus.analyse"
EXPORT_TASK = "locus.export"
GPU_QUEUE = "gpu"
IO_QUEUE = "io"

app = Celery("locus", include=["node.tasks.tasks"])


def configure_app(broker: BrokerSettings | str) -> Celery:
    """Point the shared app at a broker; called once per process from an entry point.

    ``broker`` is the node's broker settings (or just a URL, with their defaults). A
    process that serves several nodes one after another (the test suite, ``locus demo``
    after a test) must not keep pooled connections to the previous broker.
    """
    settings = BrokerSettings(url=broker) if isinstance(broker, str) else broker
    broker_url = settings.url
    options = _transport_options(settings)
    if app.conf.broker_url and (
        app.conf.broker_url != broker_url or dict(app.conf.broker_transport_options or {}) != options
    ):
        if app._pool is not None:
            app._pool.force_close_all()
        app._pool = None
        app.amqp._producer_pool = None
    app.conf.update(
        broker_url=broker_url,
        # No result backend, by design: outcomes live in the results database (the source
        # of truth every reader uses); nothing ever waits on an AsyncResult.
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=IO_QUEUE,
        task_routes={ANALYSE_TASK: {"queue": GPU_QUEUE}, EXPORT_TASK: {"queue": IO_QUEUE}},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        enable_utc=True,
    )
    app.conf.broker_transport_options = options
    return app


def _transport_options(settings: BrokerSettings) -> dict[str, object]:
    """kombu transport options for the broker's scheme."""
    scheme = settings.url.split(":", 1)[0]
    options: dict[str, object] = {}
    if scheme in ("redis", "rediss", "sqs"):
        # Redeliver an unacknowledged message after this long (the worker was killed).
        options["visibility_timeout"] = settings.visibility_timeout_s
    if scheme in ("redis", "rediss"):
        # Look for abandoned messages every min(10 s, timeout/2) with no throttle, so
        # one comes back within about visibility_timeout_s (kombu: 10 s x 10 calls).
        options["unacked_restore_interval"] = max(1, int(min(10.0, settings.visibility_timeout_s / 2)))
        options["unacked_restore_throttle"] = 1
        if settings.key_prefix:
            options["global_keyprefix"] = settings.key_prefix
    return options
