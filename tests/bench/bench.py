#!/usr/bin/python3
"""sflb benchmark orchestrator. Run through run-bench.sh (which installs, builds and cleans up).

Starts on 127.0.0.1 only: a fixed-response nginx upstream, nginx as a key-rotating reverse
proxy, sflb-fake-upstream (simulated SiliconFlow), sflb-controlplane and sflb-dataplane(s);
runs the scenarios and prints one table of figures side by side from the same run.
Standard library only (Debian's /usr/bin/python3).
"""

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

USER_KEY = "lb-bench-user-key-5c1e0a"
ADMIN_KEY = "lb-bench-admin-key-93d7f2"
MODEL = "Qwen/Qwen2.5-7B-Instruct"

# The fixed upstream's answer: a realistic non-streamed chat completion (with usage, so sflb
# does its usual JSON scan of the body).
FIXED_BODY = json.dumps({
    "id": "chatcmpl-0123456789abcdef0123456789abcdef",
    "object": "chat.completion",
    "created": 1718000000,
    "model": MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant",
                                         "content": "Load balancers spread requests over keys."},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
    "system_fingerprint": "",
}, separators=(",", ":"))
REQUEST_BODY = json.dumps({
    "model": MODEL,
    "messages": [{"role": "system", "content": "You are a helpful assistant."},
                 {"role": "user", "content": "Say hello in one short sentence."}],
    "max_tokens": 32, "temperature": 0.7}, separators=(",", ":"))


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid):
    """{'rss_kb', 'hwm_kb', 'threads'} of a live process, or None."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss_kb"] = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    out["hwm_kb"] = int(line.split()[1])
                elif line.startswith("Threads:"):
                    out["threads"] = int(line.split()[1])
    except OSError:
        return None
    return out


def cpu_seconds(pids):
    """utime + stime of `pids` (live ones), in seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            pass
    return total / tick


def children_of(pid):
    kids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError):
            continue
        if ppid == pid:
            kids.append(int(d))
    return kids


def reset_peak(pid):
    """Resets VmHWM (peak RSS) of `pid` so a later read covers only what follows."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class Sampler:
    """Samples summed VmRSS and Threads of `pids_fn()` every 100 ms; keeps the peaks."""

    def __init__(self, pids_fn):
        self.pids_fn = pids_fn
        self.peak_rss_kb = 0
        self.peak_threads = 0
        self.peak_hwm_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        for pid in self.pids_fn():
            reset_peak(pid)
        self._cpu0 = cpu_seconds(self.pids_fn())
        self._thread.start()
        return self

    def _sample(self):
        rss = threads = hwm = 0
        for pid in self.pids_fn():
            st = proc_status(pid)
            if st:
                rss += st.get("rss_kb", 0)
                threads += st.get("threads", 0)
                hwm += st.get("hwm_kb", 0)
        self.peak_rss_kb = max(self.peak_rss_kb, rss)
        self.peak_threads = max(self.peak_threads, threads)
        self.peak_hwm_kb = max(self.peak_hwm_kb, hwm)

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(0.1)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        self.cpu_s = cpu_seconds(self.pids_fn()) - self._cpu0

    def result(self):
        # VmHWM catches peaks between samples; the summed sampled RSS catches multi-process sums.
        return {"peak_rss_mib": round(max(self.peak_rss_kb, self.peak_hwm_kb) / 1024, 1),
                "peak_threads": self.peak_threads, "cpu_s": round(self.cpu_s, 2)}


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = args.workdir
        self.bin = args.bindir
        self.procs = {}  # name -> Popen
        self.logs = {}  # name -> log file of its latest start
        self.results = {"meta": {}, "nonstream": {}, "stream": {}, "control": {}, "profile": {}}
        self.keys = [f"sk-bench-{i:02d}-{os.urandom(8).hex()}" for i in range(args.keys)]
        self.pidfile = os.path.join(self.work, "pids")

    # ----------------------------------------------------------------------------- processes

    def start(self, name, cmd, env=None, log_name=None):
        # A fresh log per start: a restarted dataplane must not be read from its old log.
        log_path = os.path.join(self.work, log_name or f"{name}.log")
        n = 1
        while os.path.exists(log_path):
            n += 1
            log_path = os.path.join(self.work, f"{name}.{n}.log")
        self.logs[name] = log_path
        full_env = dict(os.environ)
        full_env.update(env or {})
        f = open(log_path, "ab")
        p = subprocess.Popen(cmd, env=full_env, stdout=f, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL)
        f.close()
        self.procs[name] = p
        with open(self.pidfile, "a") as pf:
            pf.write(f"{p.pid}\n")
        return p

    def stop(self, name, grace=10):
        p = self.procs.pop(name, None)
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)

    def stop_all(self):
        for name in list(self.procs):
            self.stop(name)

    def wait_log(self, name, pattern, timeout=30):
        path = self.logs[name]
        deadline = time.time() + timeout
        rx = re.compile(pattern)
        while time.time() < deadline:
            p = self.procs.get(name)
            if p is not None and p.poll() is not None:
                raise RuntimeError(f"{name} exited ({p.returncode}); see {path}:\n" +
                                   open(path, errors="replace").read()[-2000:])
            try:
                with open(path, errors="replace") as f:
                    for line in f:
                        m = rx.search(line)
                        if m:
                            return m
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{name}: no line matching {pattern!r} within {timeout}s")

    def http(self, port, method, path, body=None, headers=None, timeout=30):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, data

    def wait_http(self, port, path, headers=None, timeout=30, want=200):
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            try:
                status, body = self.http(port, "GET", path, headers=headers, timeout=2)
                if status == want:
                    return body
                last = status
            except OSError as e:
                last = e
            time.sleep(0.05)
        raise RuntimeError(f"127.0.0.1:{port}{path} not {want} within {timeout}s (last: {last})")

    # ----------------------------------------------------------------------------- the system

    def start_fake(self):
        # A thread per connection, idle keep-alive ones included: besides the streams, the
        # proxies' pooled upstream connections (nginx: keepalive 512 per worker x 2; sflb: up
        # to 512) each hold one. Too few threads queue new streams behind them (seconds).
        threads = self.args.max_streams + 600 + 2 * 512 + 512
        self.start("fake", [os.path.join(self.bin, "sflb-fake-upstream"), "--port", "0",
                            "--threads", str(threads), "--quiet"])
        m = self.wait_log("fake", r'"event":"listening","port":(\d+)')
        self.fake_port = int(m.group(1))
        # httplib's pool starts all its threads up front: let it finish before measuring.
        deadline = time.time() + 30
        while time.time() < deadline:
            st = proc_status(self.procs["fake"].pid) or {}
            if st.get("threads", 0) >= threads:
                break
            time.sleep(0.1)
        time.sleep(1)
        log(f"fake SiliconFlow on 127.0.0.1:{self.fake_port} ({threads} threads)")

    def nginx_conf_common(self, name, workers):
        d = os.path.join(self.work, name)
        os.makedirs(d, exist_ok=True)
        temp = "\n".join(f"  {k}_temp_path {d}/{k};" for k in
                         ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        return d, f"""
user root;
worker_processes {workers};
worker_rlimit_nofile {self.args.nofile};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
daemon off;
events {{ worker_connections {self.args.nofile // 2}; multi_accept on; }}
http {{
{temp}
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  client_body_buffer_size 64k;
"""

    def start_nginx_upstream(self):
        self.up_port = free_port()
        d, conf = self.nginx_conf_common("nginx-upstream", self.args.nginx_workers)
        body = FIXED_BODY.replace("'", "\\'")
        conf += f"""
  access_log off;
  server {{
    listen 127.0.0.1:{self.up_port} backlog=4096;
    location / {{
      default_type application/json;
      return 200 '{body}';
    }}
  }}
}}
"""
        path = os.path.join(d, "nginx.conf")
        with open(path, "w") as f:
            f.write(conf)
        self.start("nginx-upstream", ["nginx", "-c", path, "-p", d])
        self.wait_http(self.up_port, "/v1/models", timeout=15)
        log(f"nginx fixed upstream on 127.0.0.1:{self.up_port} ({len(FIXED_BODY)}-byte body)")

    def start_nginx_proxy(self):
        self.ngx_fixed_port = free_port()
        self.ngx_fake_port = free_port()
        d, conf = self.nginx_conf_common("nginx-proxy", self.args.nginx_workers)
        # Key rotation in plain nginx: split_clients hashes a per-request value into buckets of
        # equal weight, one per key. $request_id is 16 random bytes per request, so the keys are
        # spread uniformly (random, not strict round robin: nginx has no per-request counter
        # without njs/perl; upstream round robin picks servers, not header values).
        n = len(self.keys)
        pct = int(10000 / n) / 100.0
        buckets = "\n".join(f'    {pct:.2f}% "Bearer {k}";' for k in self.keys[:-1])
        buckets += f'\n    * "Bearer {self.keys[-1]}";'
        proxy_common = """
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization $sflb_upstream_key;
      proxy_read_timeout 600s;
      proxy_send_timeout 600s;
"""
        conf += f"""
  log_format bench '$remote_addr [$time_local] "$request" $status $body_bytes_sent '
                   '$request_time $upstream_response_time $request_id';
  access_log {d}/access.log bench;
  split_clients "${{request_id}}" $sflb_upstream_key {{
{buckets}
  }}
  map $http_authorization $sflb_client_ok {{
    "Bearer {USER_KEY}" 1;
    default 0;
  }}
  upstream fixed_upstream {{
    server 127.0.0.1:{self.up_port};
    keepalive 512;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
  }}
  upstream fake_upstream {{
    server 127.0.0.1:{self.fake_port};
    keepalive 512;
    keepalive_requests 1000000;
    keepalive_timeout 4s;
  }}
  server {{
    listen 127.0.0.1:{self.ngx_fixed_port} backlog=4096;
    location / {{
      if ($sflb_client_ok = 0) {{ return 401; }}
      proxy_pass http://fixed_upstream;
{proxy_common}
    }}
  }}
  server {{
    listen 127.0.0.1:{self.ngx_fake_port} backlog=4096;
    location / {{
      if ($sflb_client_ok = 0) {{ return 401; }}
      proxy_pass http://fake_upstream;
      proxy_buffering off;
{proxy_common}
    }}
  }}
}}
"""
        path = os.path.join(d, "nginx.conf")
        with open(path, "w") as f:
            f.write(conf)
        self.start("nginx-proxy", ["nginx", "-c", path, "-p", d])
        self.wait_http(self.ngx_fixed_port, "/v1/models",
                       headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=15)
        log(f"nginx proxy on 127.0.0.1:{self.ngx_fixed_port} (-> fixed) and "
            f":{self.ngx_fake_port} (-> fake), {n} keys rotated by split_clients")

    def write_keys(self, keys):
        path = os.path.join(self.work, "keys.txt")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(keys) + "\n")
        os.replace(tmp, path)
        return path

    def start_controlplane(self, env_extra=None):
        self.cp_port = free_port()
        env = {"SFLB_LISTEN": f"127.0.0.1:{self.cp_port}",
               "SFLB_KEYS_FILE": self.write_keys(self.keys),
               "LB_ADMIN_KEY": ADMIN_KEY,
               "SILICONFLOW_BASE_URL": f"http://127.0.0.1:{self.fake_port}/v1"}
        env.update(env_extra or {})
        self.start("controlplane", [os.path.join(self.bin, "sflb-controlplane")], env)
        self.wait_log("controlplane", r'"event":"listening"')
        log(f"controlplane on 127.0.0.1:{self.cp_port}")

    def start_dataplane(self, name, upstream_port, extra_env=None, wrapper=None, timeout=30):
        env = {"PORT": "0", "SFLB_HOST": "127.0.0.1",
               "LB_API_KEY": USER_KEY, "LB_ADMIN_KEY": ADMIN_KEY,
               "SILICONFLOW_BASE_URL": f"http://127.0.0.1:{upstream_port}/v1",
               "SFLB_CONTROLPLANE": f"127.0.0.1:{self.cp_port}",
               "SFLB_REPLICA_ID": name,
               "SFLB_REQUEST_LOG": "true", "SFLB_LOG_LEVEL": "info",
               # Metrics on, as deployed, on a free port: several replicas run side by side.
               "SFLB_METRICS_LISTEN": "127.0.0.1:0"}
        env.update(extra_env or {})
        env.update(self.args.dp_env_map)
        cmd = (wrapper or []) + [os.path.join(self.bin, "sflb-dataplane")]
        self.start(name, cmd, env)
        m = self.wait_log(name, r'"event":"listening".*?"port":(\d+)', timeout=timeout)
        port = int(m.group(1))
        self.wait_http(port, "/readyz", timeout=timeout)
        return port

    def ctl(self, *args):
        env = dict(os.environ, SFLB_CONTROLPLANE=f"127.0.0.1:{self.cp_port}",
                   LB_ADMIN_KEY=ADMIN_KEY)
        t0 = time.perf_counter()
        r = subprocess.run([os.path.join(self.bin, "sflbctl"), *args], env=env,
                           capture_output=True, text=True, timeout=60)
        return r, time.perf_counter() - t0

    def cp_stats(self):
        r, _ = self.ctl("stats", "--json")
        if r.returncode != 0:
            raise RuntimeError(f"sflbctl stats failed: {r.stderr}")
        return json.loads(r.stdout)

    # ----------------------------------------------------------------------------- load tools

    def wrk(self, url, conns, duration, script="post.lua", extra_env=None, threads=None,
            timeout_extra=20):
        threads = threads or (1 if conns == 1 else min(2, conns))
        cmd = ["wrk", "-t", str(threads), "-c", str(conns), "-d", f"{duration}s",
               "--timeout", "10s", "-s", os.path.join(self.work, script), url]
        env = dict(os.environ, BENCH_AUTH=f"Bearer {USER_KEY}")
        env.update(extra_env or {})
        r = subprocess.run(cmd, capture_output=True, text=True, env=env,
                           timeout=duration + timeout_extra)
        for line in r.stdout.splitlines():
            if line.startswith("BENCHJSON "):
                out = json.loads(line[len("BENCHJSON "):])
                out["rps"] = out["requests"] / (out["duration_us"] / 1e6)
                return out
        raise RuntimeError(f"wrk gave no result: {r.stdout}\n{r.stderr}")

    def write_lua(self):
        body = REQUEST_BODY.replace("\\", "\\\\").replace('"', '\\"')
        with open(os.path.join(self.work, "post.lua"), "w") as f:
            f.write(f"""
wrk.method = "POST"
wrk.body = "{body}"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = os.getenv("BENCH_AUTH")
local limit = tonumber(os.getenv("BENCH_LIMIT") or "0")
local count = 0
if limit > 0 then
  response = function(status, headers, body)
    count = count + 1
    if count >= limit then wrk.thread:stop() end
  end
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {{"requests":%d,"duration_us":%d,"errors_connect":%d,"errors_read":%d,' ..
    '"errors_write":%d,"errors_status":%d,"errors_timeout":%d,"p50_us":%d,"p90_us":%d,' ..
    '"p99_us":%d,"p999_us":%d,"max_us":%d,"mean_us":%.1f}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
""")

    # ----------------------------------------------------------------------------- scenario 1

    def scenario_nonstream(self):
        a = self.args
        dp_port = self.start_dataplane("dp-fixed", self.up_port)
        up_master = self.procs["nginx-upstream"].pid
        ngx_master = self.procs["nginx-proxy"].pid
        dp_pid = self.procs["dp-fixed"].pid
        targets = [("direct", self.up_port, lambda: children_of(up_master)),
                   ("nginx", self.ngx_fixed_port, lambda: children_of(ngx_master)),
                   ("sflb", dp_port, lambda: [dp_pid])]
        res = self.results["nonstream"]
        res["params"] = {"duration_s": a.duration, "warmup_s": a.warmup,
                         "concurrency": a.concurrency}
        for c in a.concurrency:
            for name, port, pids in targets:
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                if a.warmup > 0:
                    self.wrk(url, c, a.warmup)
                with Sampler(pids) as smp:
                    r = self.wrk(url, c, a.duration)
                # CPU the server under test burnt per request (for "direct": nginx upstream;
                # for the proxies: the proxy alone, not its upstream). Robust to noise.
                r["cpu_us_per_req"] = smp.cpu_s * 1e6 / max(1, r["requests"])
                r["peak_threads"] = smp.peak_threads
                res[f"{name}@{c}"] = r
                log(f"non-streaming c={c:<4} {name:<6} {r['rps']:9.0f} req/s  p50 "
                    f"{r['p50_us']/1000:.3f} ms  p99 {r['p99_us']/1000:.3f} ms  p99.9 "
                    f"{r['p999_us']/1000:.3f} ms  errors "
                    f"{r['errors_status'] + r['errors_read'] + r['errors_connect'] + r['errors_timeout']}")
        st = proc_status(self.procs["dp-fixed"].pid)
        res["dp_after"] = st
        self.dp_fixed_port = dp_port

    # ----------------------------------------------------------------------------- scenario 2

    def sse_load(self, port, n, label, auth=True):
        a = self.args
        ramp = n / a.connect_rate
        timeout = min(30.0, ramp + a.chunks * a.delay_max / 1000.0 + 15)
        cmd = [self.args.sse_load, "--port", str(port), "--streams", str(n),
               "--chunks", str(a.chunks), "--delay-min-ms", str(a.delay_min),
               "--delay-max-ms", str(a.delay_max), "--connect-rate", str(a.connect_rate),
               "--timeout-s", str(timeout), "--threads", "1", "--label", label,
               "--model", MODEL]
        if auth:
            cmd += ["--auth", f"Bearer {USER_KEY}"]
        if n <= 1000:
            cmd.append("--validate-json")
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 30)
        if r.returncode != 0:
            raise RuntimeError(f"sflb-sse-load failed: {r.stderr}")
        return json.loads(r.stdout)

    def wait_fake_idle(self, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            _, body = self.http(self.fake_port, "GET", "/_fake/stats")
            if json.loads(body).get("active_streams", 0) == 0:
                return
            time.sleep(0.2)

    def scenario_stream(self):
        a = self.args
        dp_port = self.start_dataplane("dp-stream", self.fake_port)
        dp_pid = self.procs["dp-stream"].pid
        fake_pid = self.procs["fake"].pid
        ngx_master = self.procs["nginx-proxy"].pid
        res = self.results["stream"]
        res["params"] = {"streams": a.streams, "chunks": a.chunks,
                         "delay_ms": [a.delay_min, a.delay_max], "connect_rate": a.connect_rate}
        for n in a.streams:
            targets = [("direct", self.fake_port, lambda: [fake_pid]),
                       ("nginx", self.ngx_fake_port, lambda: children_of(ngx_master)),
                       ("sflb", dp_port, lambda: [dp_pid])]
            for name, port, pids in targets:
                self.wait_fake_idle()
                fake_sampler = Sampler(lambda: [fake_pid])
                with Sampler(pids) as s, fake_sampler:
                    r = self.sse_load(port, n, f"{name}@{n}")
                r.update(s.result())
                r["fake_peak_rss_mib"] = fake_sampler.result()["peak_rss_mib"]
                res[f"{name}@{n}"] = r
                log(f"streaming n={n:<6} {name:<6} completed {r['completed']}/{n} failed "
                    f"{r['failed']} {r['failures'] or ''} ttfb p50 {r['ttfb_ms'].get('p50')} "
                    f"p99 {r['ttfb_ms'].get('p99')} ms gap+ p50 "
                    f"{r['gap_excess_ms'].get('p50')} p99 {r['gap_excess_ms'].get('p99')} ms "
                    f"rss {r['peak_rss_mib']} MiB threads {r['peak_threads']}")
                if r["first_error"]:
                    log(f"  first error: {r['first_error'][:300]}")
        self.stop("dp-stream")

    # ----------------------------------------------------------------------------- scenario 3

    def count_rpcs(self, name):
        """Per-method counts of gRPC calls the controlplane received, from its GRPC_TRACE=chttp2_hpack_parser
        header dump (None when that trace is not available)."""
        path = self.logs[name]
        counts = {}
        rx = re.compile(r":path: /sflb\.v1\.(\w+)/(\w+)")
        try:
            with open(path, errors="replace") as f:
                for line in f:
                    if ":path" not in line or "SVR" not in line:
                        continue
                    m = rx.search(line)
                    if m:
                        counts[m.group(2)] = counts.get(m.group(2), 0) + 1
        except OSError:
            return None
        return counts

    def scenario_control(self):
        a = self.args
        res = self.results["control"]
        # (a) Controlplane RPCs per client request at steady state, one dataplane (c=64).
        dp_port = getattr(self, "dp_fixed_port", None) or self.start_dataplane("dp-fixed",
                                                                               self.up_port)
        self.dp_fixed_port = dp_port
        url = f"http://127.0.0.1:{dp_port}/v1/chat/completions"
        self.wrk(url, 64, max(1, a.warmup))  # reach steady state (lease batch adapts)
        before_stats = self.cp_stats()
        before_rpcs = self.count_rpcs("controlplane") or {}
        r = self.wrk(url, 64, a.control_duration)
        time.sleep(1.2)  # let the last usage report land
        after_stats = self.cp_stats()
        after_rpcs = self.count_rpcs("controlplane") or {}
        requests = r["requests"]
        leased = int(after_stats.get("leased_total", 0)) - int(before_stats.get("leased_total", 0))
        reported = int(after_stats.get("total_requests", 0)) - int(
            before_stats.get("total_requests", 0))
        rpc = {m: after_rpcs.get(m, 0) - before_rpcs.get(m, 0) for m in after_rpcs}
        rpc = {m: v for m, v in rpc.items() if v > 0 and m not in ("GetStats",)}
        entry = {"requests": requests, "duration_s": a.control_duration,
                 "leased_assignments": leased, "reported_requests": reported,
                 "rpcs_by_method": rpc, "rps": r["rps"]}
        if rpc:
            total = sum(rpc.values())
            entry["rpcs_total"] = total
            entry["rpcs_per_request"] = total / max(1, requests)
            entry["method"] = "counted at the controlplane (GRPC_TRACE=chttp2_hpack_parser :path headers)"
        else:
            # Lease calls are not exposed: bound them from leased_total. The dataplane asks for
            # about 2 s of traffic per call (64..4096) and refills at half; usage reports go
            # once per report_interval (1 s) while there is traffic.
            rate = requests / a.control_duration
            batch = min(4096, max(64, 2 * rate))
            lease_calls = leased / (batch / 2 if batch > 64 else 64)
            reports = a.control_duration
            entry["rpcs_total"] = lease_calls + reports
            entry["rpcs_per_request"] = (lease_calls + reports) / max(1, requests)
            entry["method"] = "estimated from leased_total (Lease calls not exposed)"
        res["rpc"] = entry
        log(f"control: {requests} requests, {entry['rpcs_total']:.0f} controlplane RPCs "
            f"({rpc or 'estimated'}) -> {entry['rpcs_per_request']:.5f} per request")
        self.stop("dp-fixed")
        self.dp_fixed_port = None

        # (b) Round-robin fairness over 3 replicas, counted per key at the fake.
        ports = [self.start_dataplane(f"dp-rr{i}", self.fake_port) for i in range(3)]
        self.http(self.fake_port, "POST", "/_fake/reset", body=b"",
                  headers={"Content-Type": "application/json"})
        total = a.fairness_requests
        per = (total + 2) // 3
        outs = [None] * 3
        # wrk stops a thread at BENCH_LIMIT responses but its main thread sleeps the whole
        # duration: size the duration from a short probe of the rate (which also warms the
        # lease queues), capped at 30 s.
        probe = [None] * 3

        def probe_run(i):
            probe[i] = self.wrk(f"http://127.0.0.1:{ports[i]}/v1/chat/completions", 16, 2,
                                threads=1)
        ths = [threading.Thread(target=probe_run, args=(i,)) for i in range(3)]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        rate = min(p["rps"] for p in probe)
        dur = int(min(30, max(3, per / max(1.0, rate) * 1.3 + 1)))
        self.http(self.fake_port, "POST", "/_fake/reset", body=b"",
                  headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()

        def run(i):
            outs[i] = self.wrk(f"http://127.0.0.1:{ports[i]}/v1/chat/completions", 16, dur,
                               extra_env={"BENCH_LIMIT": str(per)}, threads=1)
        ths = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        elapsed = time.perf_counter() - t0
        _, body = self.http(self.fake_port, "GET", "/_fake/stats")
        stats = json.loads(body)
        by_key = {k: v for k, v in stats.get("by_key", {}).items() if k in set(self.keys)}
        counts = [by_key.get(k, 0) for k in self.keys]
        sent = sum(counts)
        fair = {"requests": sent, "elapsed_s": round(elapsed, 2), "keys": len(self.keys),
                "replicas": 3, "min": min(counts), "max": max(counts),
                "max_min": (max(counts) / min(counts)) if min(counts) else float("inf"),
                "per_replica_requests": [o["requests"] if o else 0 for o in outs]}
        res["fairness"] = fair
        log(f"fairness: {sent} requests over {len(self.keys)} keys via 3 replicas: min "
            f"{fair['min']} max {fair['max']} -> max/min {fair['max_min']:.4f} "
            f"({elapsed:.1f} s)")

        # (c) Cooldown propagation: a 429 on one key, until every replica stops using it.
        if a.cooldown_samples > 0:
            res["cooldown"] = self.measure_cooldown(ports, a.cooldown_samples)
            # The 429s left rate-limit blocks on the keys' accounts: lift them.
            for k in self.cp_stats().get("keys", []):
                self.ctl("keys", "enable", f"id:{k['id']}", "--reason", "benchmark")
        for i in range(3):
            self.stop(f"dp-rr{i}")
        self.http(self.fake_port, "POST", "/_fake/reset", body=b"",
                  headers={"Content-Type": "application/json"})

        # (d) Reload of 10,000 keys: sflbctl wall clock, and until a dataplane holds them.
        dp_port = self.start_dataplane("dp-reload", self.fake_port)
        n = a.reload_keys
        big = [f"sk-bench-r{i:05d}-{os.urandom(12).hex()}" for i in range(n)]
        cp_pid = self.procs["controlplane"].pid
        rss_before = proc_status(cp_pid)
        self.write_keys(big)
        t0 = time.perf_counter()
        r, wall = self.ctl("reload", "--reason", "benchmark")
        t_ctl = time.perf_counter()
        ok = r.returncode == 0
        propagated = None
        deadline = time.time() + 30
        hc = http.client.HTTPConnection("127.0.0.1", dp_port, timeout=5)
        while ok and time.time() < deadline:
            hc.request("GET", "/health", headers={"Authorization": f"Bearer {USER_KEY}"})
            h = json.loads(hc.getresponse().read() or b"{}")
            if h.get("stats", {}).get("totalKeys") == n:
                propagated = time.perf_counter() - t0
                break
            time.sleep(0.002)
        hc.close()
        time.sleep(0.5)
        rss_after = proc_status(cp_pid)
        dp_rss = proc_status(self.procs["dp-reload"].pid)
        # The same reload again (nothing changes): the cost of re-reading and diffing.
        r2, wall2 = self.ctl("reload", "--reason", "benchmark-noop")
        res["reload"] = {"keys": n, "ok": ok, "error": "" if ok else (r.stderr or r.stdout)[:300],
                         "sflbctl_wall_ms": round(wall * 1000, 1),
                         "noop_reload_wall_ms": round(wall2 * 1000, 1),
                         "to_dataplane_ms": round(propagated * 1000, 1) if propagated else None,
                         "cp_rss_before_mib": round(rss_before["rss_kb"] / 1024, 1),
                         "cp_rss_after_mib": round(rss_after["rss_kb"] / 1024, 1),
                         "cp_hwm_mib": round(rss_after["hwm_kb"] / 1024, 1),
                         "dp_rss_after_mib": round(dp_rss["rss_kb"] / 1024, 1)}
        # An empty command's own cost (process start, channel, auth): sflbctl version.
        _, wall_v = self.ctl("stats", "--json")
        res["reload"]["sflbctl_stats_wall_ms"] = round(wall_v * 1000, 1)
        _, wall_p = self.ctl("version")  # process start only, no RPC
        res["reload"]["sflbctl_version_wall_ms"] = round(wall_p * 1000, 1)
        log(f"reload {n} keys: sflbctl {wall*1000:.0f} ms (no-op reload {wall2*1000:.0f} ms, "
            f"sflbctl stats {wall_v*1000:.0f} ms), in the dataplane after "
            f"{res['reload']['to_dataplane_ms']} ms; controlplane RSS "
            f"{res['reload']['cp_rss_before_mib']} -> {res['reload']['cp_rss_after_mib']} MiB")
        self.stop("dp-reload")
        self.write_keys(self.keys)
        self.ctl("reload", "--reason", "benchmark-restore")

    def measure_cooldown(self, ports, samples):
        """Cooldown propagation: a client request through replica 0 whose first key gets a 429
        from the fake; the dataplane reports it at once, the controlplane records the block and
        bumps the snapshot version, and every replica's /health shows the new snapshotVersion.
        Measured from sending the client request until all 3 replicas show a higher version
        (so it includes the 429 round trip and the urgent report)."""
        conns = [http.client.HTTPConnection("127.0.0.1", p, timeout=5) for p in ports]
        auth = {"Authorization": f"Bearer {USER_KEY}"}

        def version(i):
            conns[i].request("GET", "/health", headers=auth)
            # The replica's own snapshot (not the controlplane's stats it also shows).
            return int(json.loads(conns[i].getresponse().read() or b"{}").get(
                "replica", {}).get("snapshotVersion", -1))

        times = []
        note = ""
        for _ in range(samples):
            # Settle: every replica at the same version, nothing pending.
            deadline = time.time() + 5
            while time.time() < deadline:
                base = [version(i) for i in range(3)]
                if len(set(base)) == 1:
                    break
                time.sleep(0.05)
            time.sleep(0.2)
            base = [version(i) for i in range(3)]
            self.http(self.fake_port, "POST", "/_fake/faults",
                      body=json.dumps({"key": "*", "action": "status", "status": 429,
                                       "times": 1}),
                      headers={"Content-Type": "application/json"})
            t0 = time.perf_counter()
            c = http.client.HTTPConnection("127.0.0.1", ports[0], timeout=10)
            c.request("POST", "/v1/chat/completions", body=REQUEST_BODY,
                      headers=dict(auth, **{"Content-Type": "application/json"}))
            pending = {0, 1, 2}
            deadline = time.perf_counter() + 5
            resp = c.getresponse()
            resp.read()
            c.close()
            while pending and time.perf_counter() < deadline:
                for i in list(pending):
                    if version(i) > base[i]:
                        pending.discard(i)
            if pending:
                note = ("a 429 did not change the snapshot version of every replica within 5 s "
                        f"(client got HTTP {resp.status})")
                break
            times.append((time.perf_counter() - t0) * 1000)
            # Lift the block again so the next sample starts from the same state.
            self.http(self.fake_port, "DELETE", "/_fake/faults")
        for c in conns:
            c.close()
        self.http(self.fake_port, "DELETE", "/_fake/faults")
        out = {"samples": len(times), "note": note,
               "how": "client request with a 429 on its first key -> every replica's "
                      "/health snapshotVersion increased"}
        if times:
            times.sort()
            out["p50_ms"] = round(times[len(times) // 2], 1)
            out["p99_ms"] = round(times[min(len(times) - 1, int(0.99 * (len(times) - 1) + 0.5))], 1)
            out["max_ms"] = round(times[-1], 1)
        log(f"cooldown propagation: {out}")
        return out

    # ----------------------------------------------------------------------------- scenario 4

    def scenario_profile(self):
        a = self.args
        res = self.results["profile"]
        prof = a.profiler
        if prof == "auto":
            r = subprocess.run(["perf", "stat", "-e", "instructions", "true"],
                               capture_output=True, text=True)
            prof = "perf" if (r.returncode == 0 and "not supported" not in r.stderr
                              and "instructions" in r.stderr) else "callgrind"
        res["profiler"] = prof
        if prof == "perf":
            dp_port = self.start_dataplane("dp-profile", self.up_port)
            pid = self.procs["dp-profile"].pid
            url = f"http://127.0.0.1:{dp_port}/v1/chat/completions"
            self.wrk(url, 64, max(1, a.warmup))
            data = os.path.join(self.work, "perf.data")
            event = "cycles"
            r = subprocess.run(["perf", "stat", "-e", "cycles", "true"], capture_output=True,
                               text=True)
            if "not supported" in r.stderr or r.returncode != 0:
                event = "cpu-clock"  # no hardware counters in this VM: sample on a timer
            perf = subprocess.Popen(["perf", "record", "-e", event, "-F", "999", "-g",
                                     "-p", str(pid), "-o", data, "--", "sleep",
                                     str(a.profile_duration)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            w = self.wrk(url, 64, a.profile_duration)
            perf.wait(a.profile_duration + 30)
            rep = subprocess.run(["perf", "report", "-i", data, "--no-children", "--stdio",
                                  "--sort", "dso,symbol", "-g", "none", "--percent-limit", "0.7"],
                                 capture_output=True, text=True, timeout=120)
            rows = []
            for line in rep.stdout.splitlines():
                m = re.match(r"\s+([\d.]+)%\s+(\S+)\s+\[.\]\s+(.*)", line)
                if m:
                    rows.append((float(m.group(1)), m.group(2), m.group(3).strip()))
            res.update({"event": event, "requests": w["requests"], "rps": w["rps"],
                        "top": rows[:a.profile_top], "data": data})
            self.stop("dp-profile")
        else:
            n = a.profile_requests
            dp_port = self.start_dataplane(
                "dp-profile", self.up_port, timeout=120,
                wrapper=["valgrind", "--tool=callgrind", "--callgrind-out-file=" +
                         os.path.join(self.work, "callgrind.out.%p")])
            url = f"http://127.0.0.1:{dp_port}/v1/chat/completions"
            per_thread = n // 2
            # Fixed request count (BENCH_LIMIT per wrk thread), bounded at 30 s.
            w = self.wrk(url, 64, 30, extra_env={"BENCH_LIMIT": str(per_thread)},
                         timeout_extra=60)
            self.stop("dp-profile", grace=120)
            outs = [f for f in os.listdir(self.work) if f.startswith("callgrind.out.")]
            rows = []
            if outs:
                path = os.path.join(self.work, sorted(outs)[-1])
                ann = subprocess.run(["callgrind_annotate", "--threshold=99", path],
                                     capture_output=True, text=True, timeout=120)
                total = None
                for line in ann.stdout.splitlines():
                    m = re.match(r"\s*([\d,]+)\s+\(\s*([\d.]+)%\)\s+(.*)", line)
                    if m and "PROGRAM TOTALS" in line:
                        total = int(m.group(1).replace(",", ""))
                        continue
                    m = re.match(r"\s*([\d,]+)\s+\(\s*([\d.]+)%\)\s+(\S.*)", line)
                    if m:
                        rows.append((float(m.group(2)),) + self.split_symbol(m.group(3)))
                # Inclusive cost of sflb's own functions: where the request path spends.
                inc = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100",
                                      path], capture_output=True, text=True, timeout=120)
                own = []
                for line in inc.stdout.splitlines():
                    m = re.match(r"\s*([\d,]+)\s+\(\s*([\d.]+)%\)\s+(\S.*)", line)
                    if m and "sflb::" in m.group(3) and "PROGRAM TOTALS" not in line:
                        own.append((float(m.group(2)),) + self.split_symbol(m.group(3)))
                res["inclusive_sflb"] = own[:15]
                res["total_instructions"] = total
                res["instructions_per_request"] = total / max(1, w["requests"]) if total else None
                res["data"] = path
            res.update({"requests": w["requests"], "rps": w["rps"], "top": rows[:a.profile_top],
                        "errors": w["errors_status"] + w["errors_read"] + w["errors_timeout"]})

    @staticmethod
    def split_symbol(text):
        """'file:symbol [object]' from callgrind_annotate -> (object basename, symbol)."""
        m = re.match(r"^(\S*?):(.*?)(?: \[(.*)\])?$", text.strip())
        if not m:
            return "", text.strip()
        return os.path.basename(m.group(3) or ""), m.group(2).strip()

    # ----------------------------------------------------------------------------- report

    def print_table(self):
        out = []
        W = 100

        def sep(ch="-"):
            out.append(ch * W)

        def row(metric, d="", n="", s="", ratio="", target=""):
            out.append(f"{metric:<34}{d:>13}{n:>13}{s:>13}  {ratio:<12}{target}")

        meta = self.results["meta"]
        sep("=")
        out.append(f"sflb benchmark  {meta.get('when', '')}  mode={meta.get('mode')}  "
                   f"host: {meta.get('cpus')} CPUs ({meta.get('cpu_model')}), "
                   f"{meta.get('mem_gib')} GiB, load avg before {meta.get('loadavg')}")
        out.append(f"sflb {meta.get('git', '')} Release; dataplane: auth on, request log on "
                   f"(JSON lines to a file), no TLS (plain HTTP on 127.0.0.1); "
                   f"nginx {meta.get('nginx', '')} workers={self.args.nginx_workers}, "
                   f"access_log on")
        if self.args.dp_env_map:
            out.append(f"dataplane environment overrides: {self.args.dp_env_map}")
        sep("=")
        row("METRIC", "direct", "nginx", "sflb", "sflb/nginx", "target (issue 6)")
        ns = self.results["nonstream"]
        if ns.get("params"):
            p = ns["params"]
            sep()
            out.append(f"[1] non-streaming POST /v1/chat/completions -> nginx fixed "
                       f"{len(FIXED_BODY)}-byte JSON; wrk {p['duration_s']} s per point "
                       f"(+{p['warmup_s']} s warm-up), {len(self.keys)} keys")
            for c in p["concurrency"]:
                d, n, s = (ns.get(f"{k}@{c}") for k in ("direct", "nginx", "sflb"))
                if not (d and n and s):
                    continue
                tgt = ">= 0.8x nginx" if c == 64 else ""
                row(f"c={c:<4} requests/s", f"{d['rps']:.0f}", f"{n['rps']:.0f}",
                    f"{s['rps']:.0f}", f"{s['rps']/n['rps']:.2f}x", tgt)
                for key, label in (("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9")):
                    row(f"c={c:<4} latency {label} ms", f"{d[key]/1000:.3f}",
                        f"{n[key]/1000:.3f}", f"{s[key]/1000:.3f}",
                        f"{s[key]/max(1, n[key]):.2f}x")
                for key, label in (("p50_us", "p50"), ("p99_us", "p99")):
                    tgt = "< 1 ms" if (c == 64 and label == "p99") else ""
                    row(f"c={c:<4} added {label} ms (vs direct)", "-",
                        f"{(n[key]-d[key])/1000:+.3f}", f"{(s[key]-d[key])/1000:+.3f}", "", tgt)
                row(f"c={c:<4} server CPU us/request", f"{d['cpu_us_per_req']:.1f}",
                    f"{n['cpu_us_per_req']:.1f}", f"{s['cpu_us_per_req']:.1f}",
                    f"{s['cpu_us_per_req']/max(0.01, n['cpu_us_per_req']):.2f}x")
                errs = [x["errors_status"] + x["errors_read"] + x["errors_connect"] +
                        x["errors_timeout"] + x["errors_write"] for x in (d, n, s)]
                if any(errs):
                    row(f"c={c:<4} errors", *[str(e) for e in errs])
        st = self.results["stream"]
        if st.get("params"):
            p = st["params"]
            for n_streams in p["streams"]:
                d, n, s = (st.get(f"{k}@{n_streams}") for k in ("direct", "nginx", "sflb"))
                if not (d and n and s):
                    continue
                sep()
                out.append(f"[2] streaming: {n_streams} concurrent SSE streams x {p['chunks']} "
                           f"chunks at {p['delay_ms'][0]}-{p['delay_ms'][1]} ms (fake "
                           f"SiliconFlow), opened at {p['connect_rate']:.0f}/s")
                big = n_streams >= 10000
                row("completed / failed streams", f"{d['completed']}/{d['failed']}",
                    f"{n['completed']}/{n['failed']}", f"{s['completed']}/{s['failed']}", "",
                    "0 failed" if big or n_streams == max(p["streams"]) else "")
                corrupt_kinds = ("out_of_order", "bad_event", "missing_done", "bad_framing",
                                 "error_event", "not_sse", "bad_head")

                def intact(r):
                    bad = sum(r["failures"].get(k, 0) for k in corrupt_kinds)
                    return "yes" if bad == 0 else f"NO ({bad})"
                row("events intact, in order (*)", intact(d), intact(n), intact(s))
                fe = "first_event_excess_ms"
                for q in ("p50", "p99"):
                    row(f"TTFB {q} ms (1st event - delay)", f"{d[fe].get(q, 0):.2f}",
                        f"{n[fe].get(q, 0):.2f}", f"{s[fe].get(q, 0):.2f}")
                for q in ("p50", "p99"):
                    tgt = "< 5 ms @1000" if (q == "p99" and n_streams == 1000) else ""
                    row(f"added TTFB {q} ms", "-", f"{n[fe].get(q, 0) - d[fe].get(q, 0):+.2f}",
                        f"{s[fe].get(q, 0) - d[fe].get(q, 0):+.2f}", "", tgt)
                for q in ("p50", "p99"):
                    row(f"response head {q} ms (see note)", f"{d['ttfb_ms'].get(q, 0):.2f}",
                        f"{n['ttfb_ms'].get(q, 0):.2f}", f"{s['ttfb_ms'].get(q, 0):.2f}")
                for q in ("p50", "p99", "p999"):
                    row(f"inter-chunk gap - delay {q} ms", f"{d['gap_excess_ms'].get(q, 0):.2f}",
                        f"{n['gap_excess_ms'].get(q, 0):.2f}", f"{s['gap_excess_ms'].get(q, 0):.2f}")
                for q in ("p50", "p99"):
                    row(f"added inter-chunk delay {q} ms", "-",
                        f"{n['gap_excess_ms'].get(q, 0) - d['gap_excess_ms'].get(q, 0):+.2f}",
                        f"{s['gap_excess_ms'].get(q, 0) - d['gap_excess_ms'].get(q, 0):+.2f}")
                row("peak RSS MiB (proxy; direct=fake)", f"{d['peak_rss_mib']:.0f}",
                    f"{n['peak_rss_mib']:.0f}", f"{s['peak_rss_mib']:.0f}",
                    f"{s['peak_rss_mib']/max(1, n['peak_rss_mib']):.1f}x",
                    "< 1024 MiB @10000" if big else "")
                row("peak threads (proxy; direct=fake)", str(d["peak_threads"]),
                    str(n["peak_threads"]), str(s["peak_threads"]))
                row("CPU s used (proxy; direct=fake)", f"{d.get('cpu_s', 0):.2f}",
                    f"{n.get('cpu_s', 0):.2f}", f"{s.get('cpu_s', 0):.2f}",
                    f"{s.get('cpu_s', 0)/max(0.01, n.get('cpu_s', 0)):.1f}x")
                out.append("    (*) no stream with a corrupt, missing, reordered or extra event, or a "
                           "bad framing (timeouts are counted as failed above)")
                out.append("    TTFB = time to the first SSE event minus the delay the fake was asked "
                           "to wait; note: sflb sends the response head only")
                out.append("    with the upstream's first body byte (a stalled stream is retried on "
                           "another key), so its head time includes that delay.")
                if any(r.get("first_error") for r in (d, n, s)):
                    for k, r in (("direct", d), ("nginx", n), ("sflb", s)):
                        if r.get("first_error"):
                            out.append(f"    first error via {k}: {r['first_error'][:80]} "
                                       f"{r['failures']}")
        ctl = self.results["control"]
        if ctl:
            sep()
            out.append("[3] control path (sflb only)")
            if "rpc" in ctl:
                r = ctl["rpc"]
                detail = ", ".join(f"{k} {v}" for k, v in r.get("rpcs_by_method", {}).items())
                row("controlplane RPCs per request", "", "", f"{r['rpcs_per_request']:.5f}", "",
                    "<= 0.01")
                out.append(f"    {r['requests']} requests in {r['duration_s']} s at c=64; "
                           f"{r['rpcs_total']:.0f} RPCs ({detail or r['method']}); "
                           f"{r['leased_assignments']} lease assignments")
            if "cooldown" in ctl:
                c = ctl["cooldown"]
                if c.get("samples"):
                    row("cooldown propagation p50 ms", "", "", f"{c['p50_ms']:.1f}")
                    row("cooldown propagation p99 ms", "", "", f"{c['p99_ms']:.1f}", "",
                        "< 100 ms")
                    out.append(f"    {c['samples']} samples: client request whose 1st key gets "
                               f"a 429 -> all 3 replicas hold the new snapshot "
                               f"(/health snapshotVersion). {c.get('note', '')}")
                else:
                    row("cooldown propagation", "", "", "n/a", "", "< 100 ms")
                    out.append(f"    {c.get('note', '')}")
            if "reload" in ctl:
                r = ctl["reload"]
                row(f"reload {r['keys']} keys, sflbctl ms", "", "", f"{r['sflbctl_wall_ms']:.0f}",
                    "", "< 100 ms")
                row("  ... until a dataplane holds them", "", "",
                    f"{r['to_dataplane_ms']}" if r["to_dataplane_ms"] else "n/a")
                row("controlplane RSS after, MiB", "", "", f"{r['cp_rss_after_mib']:.0f}")
                out.append(f"    (RSS before {r['cp_rss_before_mib']} MiB; no-op reload "
                           f"{r['noop_reload_wall_ms']} ms; `sflbctl version` "
                           f"{r.get('sflbctl_version_wall_ms')} ms; dataplane RSS "
                           f"{r['dp_rss_after_mib']} MiB){'' if r['ok'] else ' FAILED: ' + r['error']}")
            if "fairness" in ctl:
                f = ctl["fairness"]
                row("round-robin max/min share", "", "", f"{f['max_min']:.4f}", "", "< 1.05")
                out.append(f"    {f['requests']} requests via 3 replicas over {f['keys']} keys "
                           f"(counted at the fake): min {f['min']}, max {f['max']}")
        pr = self.results["profile"]
        if pr.get("top"):
            sep()
            if pr["profiler"] == "perf":
                out.append(f"[4] CPU profile: dataplane under perf record -e {pr['event']} -g, "
                           f"c=64 non-streaming, {pr['requests']} requests "
                           f"({pr['rps']:.0f} req/s while sampled); self time:")
            else:
                ipr = pr.get("instructions_per_request")
                out.append(f"[4] CPU profile: dataplane under callgrind, c=64, "
                           f"{pr['requests']} requests ({pr.get('errors', 0)} errors); "
                           f"{ipr:,.0f} instructions/request; exclusive cost:" if ipr else
                           "[4] CPU profile (callgrind):")
            for pct, dso, sym in pr["top"]:
                out.append(f"    {pct:6.2f}%  {dso[:22]:<22} {sym[:70]}")
            if pr.get("inclusive_sflb"):
                out.append("    inclusive cost of sflb functions (share of all instructions):")
                for pct, dso, sym in pr["inclusive_sflb"]:
                    out.append(f"    {pct:6.2f}%  {sym[:92]}")
        sep("=")
        print("\n".join(out), flush=True)

    # ----------------------------------------------------------------------------- main

    def meta(self):
        m = self.results["meta"]
        m["when"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        m["mode"] = self.args.mode
        m["cpus"] = os.cpu_count()
        try:
            with open("/proc/cpuinfo") as f:
                m["cpu_model"] = next(l.split(":", 1)[1].strip() for l in f
                                      if l.startswith("model name"))
            with open("/proc/meminfo") as f:
                m["mem_gib"] = round(int(f.readline().split()[1]) / 1024 / 1024)
            with open("/proc/loadavg") as f:
                m["loadavg"] = " ".join(f.read().split()[:3])
        except (OSError, StopIteration):
            pass
        r = subprocess.run(["nginx", "-v"], capture_output=True, text=True)
        m["nginx"] = r.stderr.strip().split("/")[-1]
        r = subprocess.run(["git", "-C", self.args.root, "describe", "--always", "--dirty"],
                           capture_output=True, text=True)
        m["git"] = r.stdout.strip()

    def run(self):
        a = self.args
        self.meta()
        self.write_lua()
        scen = set(a.scenarios)
        self.start_fake()
        need_nginx = scen & {"nonstream", "stream"}
        cp_env = {}
        if "control" in scen and a.grpc_trace:
            # Header dump of every gRPC call, to count Lease/Report calls (not exposed).
            cp_env = {"GRPC_TRACE": "chttp2_hpack_parser", "GRPC_VERBOSITY": "DEBUG"}
        self.start_controlplane(cp_env)
        if need_nginx or scen & {"profile", "control"}:
            self.start_nginx_upstream()
        if need_nginx:
            self.start_nginx_proxy()
        try:
            if "nonstream" in scen:
                self.scenario_nonstream()
                self.stop("dp-fixed")
                self.dp_fixed_port = None
            if "stream" in scen:
                self.scenario_stream()
            if "profile" in scen:
                self.scenario_profile()
            if "control" in scen:
                self.scenario_control()
        finally:
            with open(os.path.join(self.work, "results.json"), "w") as f:
                json.dump(self.results, f, indent=1)
            self.stop_all()
        self.print_table()
        if a.results:
            shutil.copy(os.path.join(self.work, "results.json"), a.results)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--root", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--bindir", required=True)
    p.add_argument("--sse-load", required=True)
    p.add_argument("--mode", default="default", choices=["quick", "default", "full"])
    p.add_argument("--scenarios", default="nonstream,stream,control")
    p.add_argument("--profiler", default="auto", choices=["auto", "perf", "callgrind"])
    p.add_argument("--results", default="")
    p.add_argument("--nofile", type=int, default=20000)
    p.add_argument("--grpc-trace", type=int, default=1)
    p.add_argument("--dp-env", action="append", default=[],
                   help="KEY=VALUE added to every dataplane's environment (experiments)")
    a = p.parse_args()
    a.dp_env_map = dict(kv.split("=", 1) for kv in a.dp_env)
    a.scenarios = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    # Parameters per mode (issue 6 asks for the "full" figures; this 2-core machine runs the
    # smaller defaults; every value is printed with the results).
    a.keys = 10
    a.profile_top = 25
    a.nginx_workers = 2
    a.chunks, a.delay_min, a.delay_max = 50, 20, 50
    a.connect_rate = 2000
    a.concurrency = [1, 64, 256]
    if a.mode == "quick":
        a.duration, a.warmup = 3, 1
        a.streams = [200]
        a.control_duration = 3
        a.fairness_requests = 10000
        a.cooldown_samples = 3
        a.reload_keys = 10000
        a.profile_duration, a.profile_requests = 3, 2000
    elif a.mode == "full":
        a.duration, a.warmup = 20, 2
        a.streams = [1000, 5000, 10000]
        a.control_duration = 10
        a.fairness_requests = 100000
        a.cooldown_samples = 5
        a.reload_keys = 10000
        a.profile_duration, a.profile_requests = 10, 20000
    else:
        a.duration, a.warmup = 10, 1
        a.streams = [1000]
        a.control_duration = 10
        a.fairness_requests = 30000
        a.cooldown_samples = 5
        a.reload_keys = 10000
        a.profile_duration, a.profile_requests = 10, 10000
    # One dataplane stream holds two descriptors (client + upstream): clamp to what fits.
    fit = (a.nofile - 256) // 2
    clamped = [min(n, fit) for n in a.streams]
    if clamped != a.streams:
        log(f"open-file limit {a.nofile}: streams clamped from {a.streams} to {clamped}")
        a.streams = clamped
    a.max_streams = max(a.streams)
    b = Bench(a)
    b.run()


if __name__ == "__main__":
    main()
