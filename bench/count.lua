-- wrk script used for every system under test, so all are measured the same way.
-- Counts answers per upstream version (the x-ping-version response header set by
-- the upstream), which checks the 90/10 split from the outside for every system
-- alike, and prints one machine-readable line at the end.
-- The response() callback costs wrk a few % of its own CPU (core 1), not the
-- proxy's (core 0); it is on for every system, the direct ceiling included.
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  counts = {}
end

-- With BENCH_USER_KEYS set (bench.py --compare-routing sticky), every
-- request carries a random x-user-id, as a sticky deployment's would; for
-- every system alike, so only the proxy's routing table differs.
if os.getenv("BENCH_USER_KEYS") then
  function request()
    wrk.headers["x-user-id"] = tostring(math.random(1, 1000000000))
    return wrk.format()
  end
end

function response(status, headers, body)
  -- wrk keeps header names as received: the Go peers (Traefik, Caddy)
  -- send the canonical X-Ping-Version, the others the upstream's lowercase.
  local key = headers["x-ping-version"] or headers["X-Ping-Version"]
  if status < 200 or status > 299 then
    key = "status_" .. status
  elseif key == nil then
    key = "no_version_header"
  end
  counts[key] = (counts[key] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    for k, n in pairs(t:get("counts")) do
      total[k] = (total[k] or 0) + n
    end
  end
  local parts = {}
  for k, n in pairs(total) do
    table.insert(parts, k .. "=" .. n)
  end
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d p50_us=%d p99_us=%d p999_us=%d max_us=%d " ..
    "err_connect=%d err_read=%d err_write=%d err_status=%d err_timeout=%d counts=%s\n",
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout, table.concat(parts, ",")))
end
