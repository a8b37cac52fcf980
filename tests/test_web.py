"""ghubai.web patches two private methods of hypercorn's trio server: it must refuse to import
when they are gone, rather than serve without its fixes."""

from __future__ import annotations

import subprocess
import sys


def test_web_refuses_a_hypercorn_without_the_methods_it_patches() -> None:
    script = ("from hypercorn.trio.tcp_server import TCPServer\n"
              "del TCPServer.protocol_send\n"
              "import ghubai.web\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "ImportError: ghubai.web patches TCPServer.protocol_send(self, event)" in result.stderr
