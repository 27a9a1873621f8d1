-- wrk script for case (a): the same POST on every request; results as one JSON line.
--   BENCH_BODY  the JSON request body
--   BENCH_AUTH  the API key ("" sends no Authorization header)
-- done() prints "BENCHJSON {...}" with latency percentiles in microseconds.

local body = os.getenv("BENCH_BODY") or '{"model":"demo","messages":[{"role":"user","content":"hi"}]}'
local auth = os.getenv("BENCH_AUTH") or ""

wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
if auth ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. auth
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"mean":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9)))
end
