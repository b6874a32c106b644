"""Creates N idle sessions on a running `performer serve`, reports the server's RSS, then
resumes every one (a 1-token completion) and reports how many answered 200.
Usage: idle_sessions.py BASE_URL SERVER_PID [N]   (standard library only)"""

import http.client
import json
import sys
import urllib.parse


def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def main():
    base, pid = sys.argv[1], int(sys.argv[2])
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
    u = urllib.parse.urlparse(base)
    conn = http.client.HTTPConnection(u.hostname, u.port)

    def post(path, body):
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"null")

    start = rss(pid)
    ids = []
    for i in range(n):
        status, v = post("/v1/sessions", {"prompt": f"Session {i}: once upon a time"})
        assert status == 201, (status, v)
        ids.append(v["id"])
    created = rss(pid)
    ok = 0
    for sid in ids:
        status, v = post(f"/v1/sessions/{sid}/completions", {"max_tokens": 1, "temperature": 0})
        ok += status == 200 and v["usage"]["completion_tokens"] == 1
    resumed = rss(pid)
    conn.request("GET", "/metrics")
    metrics = conn.getresponse().read().decode()
    gauges = {
        line.split()[0]: line.split()[1]
        for line in metrics.splitlines()
        if line.startswith("performer_session") and not line.startswith("#")
    }
    mib = lambda b: f"{b / 1048576:.1f} MiB"
    print(f"RSS at start {mib(start[0])}, after {n} sessions {mib(created[0])}, "
          f"after resuming all {mib(resumed[0])} (peak {mib(resumed[1])})")
    print(f"resumed {ok}/{n}; {gauges}")
    return 0 if ok == n else 1


if __name__ == "__main__":
    sys.exit(main())
