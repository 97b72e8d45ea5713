"""A real SMTP server for the email action's tests (aiosmtpd).

Listens on 127.0.0.1 on a free port and prints {"port": N} on one stdout line once ready.
Every accepted message is written to OUT_DIR as <n>.json: the envelope (mail_from, rcpt_tos),
the AUTH login and password the client used, and the raw message. Recipients choose replies:
  reject-*@...     550 5.1.1 at RCPT (permanent)
  defer-once-*@... 451 4.3.0 at RCPT the first time the address is seen, accepted after
Exits when its stdin closes (the test process went away).

Usage: python3 smtp_server.py OUT_DIR
"""

import asyncio
import json
import os
import sys
import threading

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


class Handler:
    def __init__(self, out_dir):
        self.out_dir = out_dir
        self.deferred = set()
        self.count = 0

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@", 1)[0]
        if local.startswith("reject-"):
            return f"550 5.1.1 <{address}>: mailbox unavailable"
        if local.startswith("defer-once-") and address not in self.deferred:
            self.deferred.add(address)
            return "451 4.3.0 try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.count += 1
        login = password = None
        if isinstance(session.auth_data, LoginPassword):
            login = session.auth_data.login.decode()
            password = session.auth_data.password.decode()
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "login": login,
            "password": password,
            "message": envelope.original_content.decode("utf-8", "replace"),
        }
        path = os.path.join(self.out_dir, f"{self.count}.json")
        with open(path + ".tmp", "w") as file:
            json.dump(record, file)
        os.replace(path + ".tmp", path)
        return "250 2.0.0 queued as message-%d" % self.count


def authenticator(server, session, envelope, mechanism, auth_data):
    return AuthResult(success=isinstance(auth_data, LoginPassword), auth_data=auth_data)


def exit_when_stdin_closes(loop):
    sys.stdin.read()
    loop.call_soon_threadsafe(loop.stop)


def main():
    out_dir = sys.argv[1]
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    handler = Handler(out_dir)
    factory = lambda: SMTP(
        handler,
        hostname="smtp.test",
        authenticator=authenticator,
        auth_require_tls=False,
        loop=loop,
    )
    server = loop.run_until_complete(loop.create_server(factory, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    print(json.dumps({"port": port}), flush=True)
    threading.Thread(target=exit_when_stdin_closes, args=(loop,), daemon=True).start()
    loop.run_forever()


if __name__ == "__main__":
    main()
