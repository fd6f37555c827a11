"""``make demo``: a compromised account sprays harvested addresses and gets frozen.

Starts a real Exim (configured with the shipped ``contrib/exim/`` files), spamguardd and a fake
remote MX on loopback, plays the attack over real SMTP and prints what each part saw. Needs
root (Exim is run with ``-C``) and Debian's exim4-daemon-light. Nothing outside one scratch
directory under /tmp is touched; it is removed at the end unless ``--keep`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.eximlab import EximLab, wait_for

LIMIT = 5
SPAMMER = "mallory"
KEY = f"auth:{SPAMMER}"


def say(text: str = "") -> None:
    print(text, flush=True)


def title(text: str) -> None:
    say()
    say(f"== {text} " + "=" * max(0, 76 - len(text)))


FAILED = [0]


def spray(lab: EximLab, wave: int) -> str | None:
    """One spam run: a real-looking recipient plus three harvested ones."""
    good = f"customer{wave}@remote.test"
    harvested = [f"bad{wave}{n}@remote.test" for n in range(3)]
    sent = lab.send([good, *harvested], user=SPAMMER, subject=f"Cheap watches {wave}")
    for rcpt in harvested:
        code, text = sent.refused.get(rcpt, (250, b"accepted"))
        shown = text.decode(errors="replace").replace("\n", " / ")
        FAILED[0] += code >= 500
        say(f"  RCPT {rcpt:<22} -> {code} {shown}")
    say(f"  recipients of {KEY} refused so far: {FAILED[0]} (block at {LIMIT} per hour)")
    if sent.message_id is None:
        return None
    lab.wait_queue_settled(sent.message_id)
    frozen = sent.message_id in lab.frozen_ids()
    state = "FROZEN" if frozen else "delivered"
    say(f"  message {sent.message_id} for {good}: {state}")
    return sent.message_id if frozen else None


def show_setup(lab: EximLab) -> None:
    title("set-up")
    say(f"  Exim 4.96 on 127.0.0.1:{lab.port}, config {lab.config}")
    say("    (.include-s contrib/exim/spamguardd-macros.conf, spamguardd.conf, -event.conf)")
    say(f"  spamguardd on {lab.spamguard.socket}, limit {LIMIT} failed recipients per hour")
    say(f"  fake remote MX on 127.0.0.1:{lab.mx.port}: bad* recipients do not exist")
    title("a normal user")
    sent = lab.send(["partner@remote.test", "friend@remote.test"], user="alice")
    wait_for("delivery", lambda: lab.mx.delivered_to("friend@remote.test"))
    say(f"  alice -> partner, friend: delivered ({sent.message_id})")


def show_evidence(lab: EximLab, frozen: list[str]) -> None:
    title("spamguardd saw")
    for line in lab.spamguard.log.read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "user_blocked":
            say(f"  user_blocked user={event['user']} reason={event['reason']!r}")
    say(f"  check {KEY} -> {lab.spamguard.ask(f'check user={KEY}')}")
    say(f"  block file {lab.spamguard.blocked} (Exim reads it if the daemon is down):")
    for line in lab.spamguard.blocked.read_text().splitlines():
        if not line.startswith("#"):
            say(f"    {line}")
    title("Exim's main log (spamguardd lines)")
    for line in lab.mainlog.read_text().splitlines():
        if "spamguardd" in line or "frozen" in line:
            say(f"  {line}")
    title("the frozen queue: exim -bp / exiqgrep -z -i")
    for line in lab.queue().splitlines():
        say(f"  {line}")
    say(f"  frozen ids: {' '.join(lab.frozen_ids())}")
    if frozen:
        header = [h for h in lab.headers(frozen[0]).splitlines() if "X-Spamguard-User" in h]
        say(f"  exim -Mvh {frozen[0]} | grep X-Spamguard:  {header[0].strip()}")


def show_release(lab: EximLab, frozen: list[str]) -> None:
    title("releasing")
    say(f"  (add -C {lab.config} to reach this demo's Exim)")
    say("  Once the account is secured (new password), as root:")
    say("    exiqgrep -z -i                          # frozen messages")
    say("    exim -Mvh ID | grep X-Spamguard-User    # whose they are")
    say("    exim -Mrm ID                            # remove the spam")
    say("    exim -Mt ID && exim -M ID               # thaw and deliver a real message")
    say("  and lift the block through spamguardd's admin interface (or, with the daemon")
    say("  stopped, delete the user's line from the block file). Never use exim -qff:")
    say("  it delivers frozen messages too.")
    if frozen:
        target = frozen[0]
        lab.run_exim("-Mt", target)
        lab.run_exim("-M", target)
        wait_for("the thawed message", lambda: lab.mx.delivered_to("customer2@remote.test"))
        outcome = "delivered" if target not in lab.queue() else "still queued"
        say(f"  here: exim -Mt {target}; exim -M {target} -> {outcome}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()
    lab = EximLab(limit=f"{LIMIT}/1h", keep=args.keep)
    try:
        lab.start()
        show_setup(lab)
        title(f"{SPAMMER}'s password was phished: the account sprays harvested addresses")
        frozen = [message for wave in range(1, 4) if (message := spray(lab, wave))]
        show_evidence(lab, frozen)
        title("the daemon goes down: the block still holds (lsearch fallback)")
        lab.spamguard.stop()
        still = spray(lab, 9)
        say(f"  with the daemon stopped the message is {'frozen' if still else 'NOT frozen'}")
        lab.spamguard.start()
        show_release(lab, frozen)
    finally:
        lab.stop()
        if args.keep:
            say(f"\nkept {lab.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
