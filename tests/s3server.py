"""A real S3 server for tests: SeaweedFS, bound to 127.0.0.1, free ports, auth on.

The implementation lives in ``infra/seaweedfs.py`` (shared with the local stack,
``make up``); this module keeps the tests' import path and API:
``start_s3_server(data_dir)`` -> a ready :class:`S3Server` with ``endpoint_url``,
``access_key``, ``secret_key``, ``env()``, ``client()``, ``stop()``/``start()``/
``kill()``/``restart()`` (same ports and data), plus ``free_ports`` and
``find_weed``. See ``infra/seaweedfs.py`` for what was learnt about SeaweedFS.

Manual use: ``python tests/s3server.py /tmp/s3data`` prints the AWS_* exports.
"""

from __future__ import annotations

import sys
from pathlib import Path

_REPO = str(Path(__file__).resolve().parents[1])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from infra.seaweedfs import (  # noqa: E402
    _PORT_NAMES,
    HOST,
    PORT_NAMES,
    PROBE_BUCKET,
    REGION,
    S3Server,
    _running,
    _set_pdeathsig,
    _stop_all,
    find_weed,
    free_ports,
    main,
    start_s3_server,
)

__all__ = [
    "HOST",
    "PORT_NAMES",
    "PROBE_BUCKET",
    "REGION",
    "S3Server",
    "_PORT_NAMES",
    "_running",
    "_set_pdeathsig",
    "_stop_all",
    "find_weed",
    "free_ports",
    "start_s3_server",
]

if __name__ == "__main__":
    main()
