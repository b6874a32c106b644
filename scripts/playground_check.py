"""Drives headless Chromium over the DevTools protocol (standard library only: a minimal
WebSocket client): opens the playground, fills in a prompt, clicks Generate, waits until the
page reports the finished generation, checks the streamed text, and saves a screenshot.
Usage: playground_check.py CHROMIUM PAGE_URL OUT.png PROFILE_DIR"""

import base64
import http.client
import json
import os
import socket
import struct
import subprocess
import sys
import time


class WebSocket:
    def __init__(self, url):
        assert url.startswith("ws://")
        hostport, path = url[5:].split("/", 1)
        host, port = hostport.split(":")
        self.sock = socket.create_connection((host, int(port)))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
             f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert b" 101 " in head.split(b"\r\n")[0], head

    def send(self, text):
        data = text.encode()
        mask = os.urandom(4)
        n = len(data)
        if n < 126:
            header = struct.pack("!BB", 0x81, 0x80 | n)
        elif n < 65536:
            header = struct.pack("!BBH", 0x81, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def _exact(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def recv(self):
        message = b""
        while True:
            b0, b1 = self._exact(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._exact(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._exact(8))[0]
            message += self._exact(n)
            if b0 & 0x80:
                return message.decode()


class Page:
    def __init__(self, ws):
        self.ws, self.next_id = ws, 0

    def call(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(msg["error"])
                return msg["result"]

    def eval(self, expr):
        return self.call("Runtime.evaluate", expression=expr, returnByValue=True)["result"].get("value")


def main():
    chromium, url, out, profile = sys.argv[1:5]
    proc = subprocess.Popen(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         f"--user-data-dir={profile}", "--remote-debugging-port=0", "--window-size=1100,900", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = os.path.join(profile, "DevToolsActivePort")
        for _ in range(300):
            if os.path.exists(port_file) and open(port_file).read().strip():
                break
            time.sleep(0.1)
        port = int(open(port_file).read().split()[0])
        conn = http.client.HTTPConnection("127.0.0.1", port)
        conn.request("GET", "/json/list")
        target = next(t for t in json.loads(conn.getresponse().read()) if t["type"] == "page")
        page = Page(WebSocket(target["webSocketDebuggerUrl"]))
        page.call("Page.enable")
        page.call("Page.navigate", url=url)
        for _ in range(200):
            if page.eval("document.readyState") == "complete" and page.eval("!!document.getElementById('run')"):
                break
            time.sleep(0.05)
        page.eval("document.getElementById('prompt').value = 'The old lighthouse keeper'")
        page.eval("document.getElementById('max_tokens').value = '300'")
        page.eval("document.getElementById('seed').value = '7'")
        page.eval("document.getElementById('run').click()")
        status = ""
        for _ in range(600):
            status = page.eval("document.getElementById('status').textContent")
            if status.startswith("done") or status.startswith("error") or status[:1].isdigit():
                break
            time.sleep(0.05)
        text = page.eval("document.getElementById('out').textContent")
        print(f"status: {status}")
        print(f"page text: {text[:120]!r}…")
        assert status.startswith("done: 300 tokens"), status
        assert text.startswith("The old lighthouse keeper") and len(text) > len("The old lighthouse keeper") + 100
        shot = page.call("Page.captureScreenshot", format="png")["data"]
        with open(out, "wb") as f:
            f.write(base64.b64decode(shot))
        print(f"wrote {out}")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
