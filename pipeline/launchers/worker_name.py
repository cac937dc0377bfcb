"""``[core] hostname_callable`` of the Celery workers: each worker's name, so ``task_instance.hostname`` says
which worker ran a task instance (workers on one machine share the socket hostname).

Kept free of imports: every task process of a worker imports it.
"""

import os
import socket

ENV = "PIPELINE_WORKER_NAME"


def hostname() -> str:
    """The worker name the launcher gave this process tree (``worker-1`` ...), else the machine's FQDN."""
    return os.environ.get(ENV) or socket.getfqdn()
