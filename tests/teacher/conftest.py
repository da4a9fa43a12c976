"""Fixtures of the teacher tests."""

import pytest

from teacher_servers import ServerProcess


@pytest.fixture(scope="module")
def teacher_server():
    server = ServerProcess().start()
    yield server
    server.stop()
