"""A remote MX for the systemd lab: refuses local parts starting with "bad", logs what it gets.

Run inside the lab with Debian's python3 (no project imports): ``python3 fakemx.py PORT LOG``.
Each accepted message is appended to LOG as one JSON line: sender, recipients, data.
"""

from __future__ import annotations

import json
import re
import socketserver
import sys
from pathlib import Path


class Handler(socketserver.StreamRequestHandler):
    def reply(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")

    def handle(self) -> None:
        self.reply("220 mx.remote.test ESMTP")
        sender, recipients = "", list[str]()
        while line := self.rfile.readline():
            command = line.decode("utf-8", "replace").strip()
            verb = command[:4].upper()
            address = (re.findall(r"<([^>]*)>", command) or [""])[0]
            if verb in {"EHLO", "HELO"}:
                self.reply("250 mx.remote.test")
            elif verb == "MAIL":
                sender, recipients = address, []
                self.reply("250 OK")
            elif verb == "RCPT":
                if address.lower().startswith("bad"):
                    self.reply(f"550 5.1.1 <{address}>: no such user here")
                else:
                    recipients.append(address)
                    self.reply("250 Accepted")
            elif verb == "DATA":
                self.reply("354 go ahead")
                data = b""
                while (chunk := self.rfile.readline()) and chunk != b".\r\n":
                    data += chunk
                record = {"sender": sender, "recipients": recipients, "data": data.decode()}
                with Path(sys.argv[2]).open("a", encoding="utf-8") as log:
                    log.write(json.dumps(record) + "\n")
                self.reply("250 OK queued")
            elif verb == "QUIT":
                self.reply("221 bye")
                return
            else:
                self.reply("250 OK")


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


if __name__ == "__main__":
    with Server(("127.0.0.2", int(sys.argv[1])), Handler) as server:
        server.serve_forever()
