"""The local Prefect stack launcher against a real server."""
from __future__ import annotations

import pytest

from flows.local import api_healthy, status

pytestmark = pytest.mark.prefect_server


def test_server_is_real_and_reports_status(prefect_server):
    assert api_healthy(prefect_server.api_url)
    st = status(prefect_server)
    assert st["server_healthy"] is True and st["server_pid"]
    assert (prefect_server.home / "prefect.db").exists(), "SQLite database under the data root"
