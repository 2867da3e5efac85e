-- heartbeat: record liveness (and metrics) for one or more nodes in one call.
-- KEYS: 1 version, 2 log, 3 expiry zset, 4.. one node hash per heartbeat
-- ARGV: 1 log maxlen, 2 metrics epsilon, then 7 per heartbeat, in KEYS order:
--       node_id, cpu, gpu, mem, load, error_rate, health_score
-- Returns: one {outcome, node version, status, deadline_ms, changed} per heartbeat;
--          outcome 1 = recorded, 0 = unknown node, 2 = node is OFFLINE (re-register).
-- Only a material change is logged: a metric moving by at least epsilon since the
-- last logged value. Otherwise only the deadline (expiry zset) and hb_at move, so
-- liveness-only heartbeats do not flood the log.
-- Retry-safe: a repeated heartbeat finds the metrics it wrote already there (no
-- change, nothing logged) and moves the deadline to now + ttl again.
local ver_key, log_key, expiry_key = KEYS[1], KEYS[2], KEYS[3]
local maxlen, eps = ARGV[1], tonumber(ARGV[2])
local now = now_ms()
local names = {'cpu', 'gpu', 'mem', 'load', 'err'}
local out = {}
for i = 4, #KEYS do
  local node_key = KEYS[i]
  local a = 3 + (i - 4) * 7
  local node_id = ARGV[a]
  local cur = redis.call('HMGET', node_key, 'status', 'ttl', 'ver', 'cpu', 'gpu', 'mem', 'load', 'err')
  if not cur[1] then
    out[#out + 1] = {0, 0, '', 0, 0}
  elseif cur[1] == 'OFFLINE' then
    out[#out + 1] = {2, tonumber(cur[3]), 'OFFLINE', 0, 0}
  else
    local deadline = now + tonumber(cur[2])
    redis.call('ZADD', expiry_key, deadline, node_id)
    local material = false
    for j = 1, 5 do
      if math.abs(tonumber(ARGV[a + j]) - tonumber(cur[3 + j] or 0)) >= eps then material = true end
    end
    local ver = tonumber(cur[3])
    if material then
      redis.call('HSET', node_key, 'hb_at', now, 'cpu', ARGV[a + 1], 'gpu', ARGV[a + 2],
        'mem', ARGV[a + 3], 'load', ARGV[a + 4], 'err', ARGV[a + 5], 'health', ARGV[a + 6])
      ver = log_put(ver_key, log_key, maxlen, node_key, node_id)
    else
      redis.call('HSET', node_key, 'hb_at', now)
    end
    out[#out + 1] = {1, ver, cur[1], deadline, material and 1 or 0}
  end
end
return out
