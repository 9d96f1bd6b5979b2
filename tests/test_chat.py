"""`edgert chat` as a user drives it: Ctrl-C stops the reply and keeps the session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time


def test_ctrl_c_stops_the_reply_and_keeps_the_session(smollm_package, tmp_path):
    env = dict(os.environ, EDGERT_HOME=str(tmp_path), NO_COLOR="1", COLUMNS="200",
               PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "edgert", "chat", str(smollm_package),
                             "-n", "2000", "--temp", "0"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env,
                            # as a shell's background job starts it: SIGINT ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(iter(lambda: proc.stdout.read(1), "")),
                              daemon=True)
    reader.start()

    def wait_for(pred, timeout: float) -> None:
        end = time.monotonic() + timeout
        while not pred("".join(out)):
            assert time.monotonic() < end and proc.poll() is None, "".join(out)
            time.sleep(0.1)

    try:
        proc.stdin.write("Write a very long story about a dragon who learns to cook.\n")
        proc.stdin.flush()
        # the prompt, then some streamed words of the reply
        wait_for(lambda s: len(s.split(">>> ", 1)[-1].split()) > 8, 300)
        proc.send_signal(signal.SIGINT)
        wait_for(lambda s: "(stopped)" in s, 120)
        proc.stdin.write("What is the capital of France?\n/exit\n")
        proc.stdin.flush()
        proc.stdin.close()
        assert proc.wait(timeout=300) == 0
        reader.join(timeout=10)
    finally:
        proc.kill()
    text = "".join(out)
    stopped, after = text.split("(stopped)", 1)
    reply = stopped.split(">>> ", 1)[1]
    assert 8 < len(reply.split()) < 400  # stopped long before its 2000 tokens
    assert "tok/s" in after and "Paris" in after  # the session went on, history and all
    assert "Traceback" not in proc.stderr.read()
