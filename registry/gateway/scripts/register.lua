-- register: upsert a node.
-- KEYS: 1 node hash, 2 jobs hash, 3 node-id set, 4 version, 5 log, 6 expiry zset
-- ARGV: 1 node_id, 2 spec JSON (canonical), 3 capacity, 4 ttl_ms, 5 log maxlen,
--       6 adopt_ms (optional): for this long, heartbeats that report jobs re-create
--       the reservations of those jobs (see heartbeat.lua). A sidecar sets it when it
--       registers a node again after Redis lost its data or the node expired while
--       this sidecar was cut off: the node's jobs are the only record left.
--       7 metrics given ("1") or not ("0"), then 8-12 cpu, gpu, mem, load, error rate,
--       13-18 health weights (cpu, gpu, mem, load, heartbeat delay, error rate): when
--       given, the node's figures and health are stored as a heartbeat's would be, so a
--       node is ranked by what it declared before its first heartbeat.
-- Returns: {changed (0|1), flat HGETALL of the node}
-- A new node starts ONLINE; an OFFLINE node comes back ONLINE; a DRAINING node
-- stays DRAINING (a drain is an operator's decision, a node restart must not undo it).
-- Retry-safe: the second run with the same input finds spec, capacity, status and
-- ttl equal, so it logs nothing and only moves the liveness deadline forward.
local node_key, jobs_key, ids_key, ver_key, log_key, expiry_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local node_id, spec, capacity, ttl, maxlen = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local adopt = tonumber(ARGV[6] or 0)
local now = now_ms()
local m = nil
if ARGV[7] == '1' then
  m = {tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11]), 0,
    tonumber(ARGV[12])}
end
local cur = redis.call('HMGET', node_key, 'spec', 'capacity', 'status', 'ttl')
local changed = 0
if not cur[1] then
  redis.call('HSET', node_key, 'spec', spec, 'capacity', capacity, 'status', 'ONLINE',
    'ttl', ttl, 'reg_at', now, 'hb_at', now, 'cpu', 0, 'gpu', 0, 'mem', 0, 'load', 0,
    'delay', 0, 'err', 0, 'health', 1, 'jobs', redis.call('HLEN', jobs_key))
  redis.call('SADD', ids_key, node_id)
  changed = 1
else
  local status = cur[3]
  if status == 'OFFLINE' then status = 'ONLINE' end
  if cur[1] ~= spec or cur[2] ~= capacity or cur[3] ~= status or cur[4] ~= ttl then
    redis.call('HSET', node_key, 'spec', spec, 'capacity', capacity, 'status', status,
      'ttl', ttl, 'hb_at', now)
    redis.call('HDEL', node_key, 'off_at')
    changed = 1
  else
    redis.call('HSET', node_key, 'hb_at', now)
  end
end
if m then
  local figures = redis.call('HMGET', node_key, 'cpu', 'gpu', 'mem', 'load', 'err')
  local given = {m[1], m[2], m[3], m[4], m[6]}
  for j = 1, 5 do
    -- Redis keeps 14 significant digits of a Lua number: compare within 1e-9, so a
    -- retried registration finds its figures stored and changes nothing.
    if math.abs((tonumber(figures[j]) or -1) - given[j]) > 1e-9 then changed = 1 end
  end
  if changed == 1 then
    local w = {}
    for j = 1, 6 do w[j] = tonumber(ARGV[12 + j]) end
    redis.call('HSET', node_key, 'cpu', m[1], 'gpu', m[2], 'mem', m[3], 'load', m[4],
      'err', m[6], 'delay', 0, 'health', health_score(w, m))
  end
end
redis.call('ZADD', expiry_key, now + tonumber(ttl), node_id)
if adopt > 0 then redis.call('HSET', node_key, 'adopt_until', now + adopt) end
if changed == 1 then
  local _, fields = log_put(ver_key, log_key, maxlen, node_key, node_id)
  return {1, fields}
end
return {0, redis.call('HGETALL', node_key)}
