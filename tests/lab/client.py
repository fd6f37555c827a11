"""One SMTP message for the systemd lab, as a mail client would send it; prints JSON.

``python3 client.py [--user NAME] FROM RCPT...``: AUTH PLAIN (password "secret") when --user is
given; every RCPT's reply is reported, and the message goes ahead with the accepted ones.
"""

from __future__ import annotations

import json
import re
import smtplib
import sys

args = sys.argv[1:]
user = None
if args[0] == "--user":
    user, args = args[1], args[2:]
sender, recipients = args[0], args[1:]
replies: dict[str, tuple[int, str]] = {}
message_id = None
with smtplib.SMTP("127.0.0.1", 25, timeout=60) as smtp:
    smtp.ehlo("client.lab.test")
    if user is not None:
        smtp.login(user, "secret")
    smtp.mail(sender)
    for rcpt in recipients:
        code, text = smtp.rcpt(rcpt)
        replies[rcpt] = (code, text.decode())
    if any(code < 300 for code, _ in replies.values()):
        code, text = smtp.data(f"From: {sender}\r\nSubject: lab\r\n\r\nhello\r\n".encode())
        match = re.search(r"id=(\S+)", text.decode())
        message_id = match.group(1) if match else None
    else:
        smtp.rset()
print(json.dumps({"replies": replies, "message_id": message_id}))
