"""Small helpers shared by the tests."""

import re
import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for gloo's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def example_files(text: str) -> dict[str, str]:
    """``{path: content}`` of a docs page's fenced blocks whose first line is exactly ``# <path>.py|.yaml``."""
    files = {}
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE):
        m = re.fullmatch(r"# ([\w./-]+\.(?:py|yaml))", block.split("\n", 1)[0].strip())
        if m:
            files[m.group(1)] = block
    return files
